"""What every benchmark driver needs first: the scoutq command, and a reusable fixture."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def scoutq_command() -> str:
    """The `scoutq` console script of this environment (beside the interpreter if not on PATH)."""
    return shutil.which("scoutq") or str(Path(sys.executable).with_name("scoutq"))


def fixture(scoutq: str, directory: Path, preset: str, layers: int | None = None) -> Path:
    """Build (or reuse, when its manifest matches) a fixture checkpoint; exits on failure."""
    extra = ["--layers", str(layers)] if layers is not None else []
    made = subprocess.run([scoutq, "fixture", str(directory), "--preset", preset, *extra, "--reuse"])
    if made.returncode != 0:
        raise SystemExit(f"building {directory} failed")
    return directory


def scout_layers(scoutq: str, directory: Path, layers: int) -> Path:
    """`directory/scout-layers-N`: N decoder layers at real Scout dimensions."""
    return fixture(scoutq, directory / f"scout-layers-{layers}", "scout-layers", layers)


def walk_arguments(description: str | None, layers: int, samples: int, recipe: str) -> argparse.ArgumentParser:
    """The options every layer-walk benchmark takes, with this benchmark's defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--recipe", default=recipe)
    parser.add_argument("--dir", type=Path, default=Path(".cache/scoutq/bench"))
    return parser
