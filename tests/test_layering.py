"""The package layering of docs/architecture.md: imports run one way, from lower layers to higher.

Every `import scoutq.X` / `from scoutq.X import ...` in scoutq/ (module level or inside a
function: a late import is still a dependency) is checked against the table below. A package
may import its own modules, `scoutq.errors`, the package root (for `__version__`) and the
packages of lower layers; never a package of its own layer or a higher one. bench/, fixtures/
and release.py sit at the edges: they may use the library, and nothing in the library uses them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scoutq"

# Lowest first. Packages in one layer know nothing of each other.
LAYERS: list[set[str]] = [
    {"checkpoint"},
    {"data"},
    {"quant"},
    {"kernels", "foreign"},
    {"model"},
    {"stream"},
    {"calibrate", "evaluate"},
    {"pipeline", "harness"},
    {"cli"},
]
# Edges: what each may import, beyond errors and the root.
LIBRARY = set().union(*LAYERS) - {"cli"}
EDGES: dict[str, set[str]] = {
    "fixtures": {"checkpoint", "data", "quant", "kernels", "model"},
    "bench": LIBRARY | {"fixtures"},
    "release": LIBRARY | {"cli"},  # `make release` drives the CLI's commands
    "__main__": {"cli"},  # `python -m scoutq`, as torchrun starts it
}
ALWAYS = {"errors", ""}  # scoutq.errors, and `from scoutq import __version__`


def _allowed(package: str) -> set[str]:
    if package in EDGES:
        return EDGES[package] | ALWAYS | {package}
    level = next(i for i, layer in enumerate(LAYERS) if package in layer)
    below = set().union(*LAYERS[:level]) if level else set()
    allowed = below | ALWAYS | {package}
    if package == "cli":  # the `scoutq fixture` and `scoutq bench` commands build and run the edges
        allowed |= {"fixtures", "bench"}
    return allowed


def _package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if len(parts) > 1 else ("" if parts[0] == "__init__" else parts[0])


def _scoutq_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported top-level package under scoutq) for every scoutq import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "scoutq" else [f"scoutq.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "scoutq":
                found.append((node.lineno, parts[1] if len(parts) > 1 else ""))
    return found


def _violations() -> list[str]:
    known = set().union(*LAYERS) | set(EDGES) | ALWAYS
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = _package_of(path)
        if package == "":  # the root re-exports load_model; it is the public facade, not a layer
            continue
        if package not in known:
            problems.append(f"{path.relative_to(PACKAGE.parent)}: package {package!r} has no place in LAYERS")
            continue
        for line, imported in _scoutq_imports(path):
            if imported == "__version__":
                continue
            if imported not in _allowed(package):
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {package} imports {imported}")
    return problems


def test_imports_run_one_way() -> None:
    problems = _violations()
    assert not problems, "imports against the layering of docs/architecture.md:\n" + "\n".join(problems)


def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker itself: a checkpoint module importing the stream is reported, a late import too.
    fake = tmp_path / "scoutq"
    (fake / "checkpoint").mkdir(parents=True)
    (fake / "checkpoint" / "bad.py").write_text("def f():\n    from scoutq.stream.walk import LayerStream\n")
    (fake / "model").mkdir()
    (fake / "model" / "ok.py").write_text("from scoutq.checkpoint.reader import Checkpoint\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _violations() == ["scoutq/checkpoint/bad.py:2: checkpoint imports stream"]


def import_graph() -> dict[str, set[str]]:
    """Package -> the scoutq packages it imports (errors and the root left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        package = _package_of(path) or "(root)"
        imported = {name for _, name in _scoutq_imports(path)} - ALWAYS - {package, "__version__"}
        graph.setdefault(package, set()).update(imported)
    return graph


if __name__ == "__main__":  # `python tests/test_layering.py`: the import graph by folder
    for package, imported in sorted(import_graph().items()):
        print(f"{package:10s} -> {', '.join(sorted(imported)) or '-'}")
