"""The wheel, installed without the source tree, finds its shipped recipes and calibration sets.

The wheel is built (setuptools, no build isolation, no network) from a copy of the source tree,
so the working tree gets no build/ or egg-info, and installed with --no-deps into a fresh venv.
That venv reaches the dev venv's site-packages (torch and the other dependencies) through a
.pth file listing the directory: the path only, so the editable install's finder there is never
run and `import scoutq` can only find the installed wheel. Commands run from a temporary working
directory, so nothing resolves against the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parent.parent
COPIED = ("scoutq", "recipes", "calibration")
TIMEOUT = 300


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _check(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{' '.join(done.args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    for name in COPIED:
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".*"))
    return tree


@pytest.fixture(scope="module")
def wheel(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        setuptools = version("setuptools")
    except PackageNotFoundError:
        setuptools = "0"
    if int(setuptools.split(".")[0]) < 77:
        pytest.skip(f"building the wheel without isolation needs setuptools>=77 (have {setuptools}); "
                    "pip install -e '.[dev]'")
    dist = tmp_path_factory.mktemp("dist")
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", "-q", "-w", str(dist), str(source_tree)], cwd=dist))
    (built,) = dist.glob("scoutq-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel, with the dev venv's site-packages for the dependencies."""
    root = tmp_path_factory.mktemp("venv")
    _check(_run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root))
    python = root / "bin" / "python"
    _check(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                 "--disable-pip-version-check", "-q", str(wheel)], cwd=root))
    purelib = Path(_check(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               cwd=root)).strip())
    dependencies = [path for path in site.getsitepackages() if Path(path).resolve() != purelib.resolve()]
    (purelib / "scoutq-test-dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return python


def test_wheel_holds_every_source_file_and_the_shipped_data(wheel: Path, source_tree: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {path.relative_to(source_tree).as_posix() for path in (source_tree / "scoutq").rglob("*.py")}
    expected |= {f"scoutq/kernels/{path.name}" for path in (source_tree / "scoutq" / "kernels").glob("*.cpp")}
    for folder in ("recipes", "calibration"):
        expected |= {f"scoutq/{folder}/{path.name}" for path in (source_tree / folder).glob("*.yaml")}
        expected.add(f"scoutq/{folder}/__init__.py")
    expected.add("scoutq/calibration/README.md")
    tasks = source_tree / "scoutq" / "harness" / "tasks"
    expected |= {path.relative_to(source_tree).as_posix() for path in tasks.rglob("*") if path.is_file()
                 and "__pycache__" not in path.parts}
    expected.add("scoutq-lm-eval.pth")  # the lm-eval plug-in hook, at the top of site-packages
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (a package missing from pyproject's packages list?): {missing}"
    assert any(name.startswith("scoutq/recipes/w4a16-g128") for name in names)


def test_installed_package_lives_in_the_venv(venv_python: Path, tmp_path: Path) -> None:
    code = ("import json, scoutq; from scoutq.quant.recipe import shipped_recipes; "
            "from scoutq.data.sets import shipped_calibration_sets; "
            "print(json.dumps({'module': scoutq.__file__, 'recipes': [str(p) for p in shipped_recipes()], "
            "'calibration': [str(p) for p in shipped_calibration_sets()]}))")
    found = json.loads(_check(_run([str(venv_python), "-c", code], cwd=tmp_path)).strip().splitlines()[-1])
    venv = venv_python.parent.parent.resolve()
    assert Path(found["module"]).resolve().is_relative_to(venv), found["module"]
    assert {Path(p).stem for p in found["recipes"]} >= {"w4a16-g128", "w4a16-g128-gptq"}
    assert {Path(p).stem for p in found["calibration"]} >= {"builtin", "wikitext2"}
    for path in found["recipes"] + found["calibration"]:
        assert Path(path).resolve().is_relative_to(venv), path


def test_installed_wheel_registers_the_lm_eval_model(venv_python: Path, tmp_path: Path) -> None:
    """The .pth hook: lm_eval finds `scoutq` (from the venv's wheel) and keeps its own models."""
    code = ("import sys; from lm_eval.api.registry import get_model; "
            "assert 'torch' not in sys.modules, 'torch imported before any model was asked for'; "
            "import inspect; print(inspect.getfile(get_model('scoutq'))); print(get_model('hf').__name__)")
    where, hf = _check(_run([str(venv_python), "-c", code], cwd=tmp_path)).strip().splitlines()[-2:]
    assert Path(where).resolve().is_relative_to(venv_python.parent.parent.resolve()), where
    assert hf == "HFLM"


def test_installed_cli_finds_a_shipped_recipe(venv_python: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    scoutq = venv_python.parent / "scoutq"
    plan = json.loads(_check(_run([str(scoutq), "quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128",
                                   "--dry-run", "--json"], cwd=tmp_path)))
    assert plan["recipe"] == "w4a16-g128" and plan["bytes_out"] < plan["bytes_in"]


def test_installed_cli_finds_a_shipped_calibration_set(venv_python: Path, tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    scoutq = venv_python.parent / "scoutq"
    plan = json.loads(_check(_run([str(scoutq), "quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128-gptq",
                                   "--calibration", "builtin", "--dry-run", "--json"], cwd=tmp_path)))
    assert plan["recipe"] == "w4a16-g128-gptq"
    assert plan["estimated_calibration_peak_rss_bytes"] > 0
