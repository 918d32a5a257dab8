"""Where the YAML files shipped with scoutq live (recipes/, calibration/)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_dir(name: str) -> Path:
    """The package data `scoutq.<name>`: the top-level folder `name` of the source tree in an
    editable install, its copy inside the installed package from a wheel (pyproject maps one to
    the other), or the source folder when the tree is on sys.path without being installed."""
    try:
        return Path(str(files(f"scoutq.{name}")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / name


def shipped_yaml(name: str) -> list[Path]:
    """The YAML files of shipped folder `name`, sorted."""
    return sorted(shipped_dir(name).glob("*.yaml"))
