"""Build hook: install `scoutq-lm-eval.pth` at the top of site-packages.

Everything else about the build is in pyproject.toml. The .pth file's one line imports
scoutq/harness/hook.py at interpreter start, which is what makes `lm_eval --model scoutq` work
without any scoutq import by the user (lm-evaluation-harness has no plug-in entry point for
models). setuptools offers no declarative way to place a file at the top of site-packages, so
the regular build (wheels) writes it beside the packages, and the editable build (`pip install
-e .`) adds it to the editable wheel next to setuptools' own finder .pth.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "scoutq-lm-eval.pth"
PTH_LINE = "import scoutq.harness.hook\n"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        with open(target, "w", encoding="utf-8") as out:
            out.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


class _StrategyWithPth:
    """setuptools' editable strategy, plus the .pth written into the editable wheel."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    def __enter__(self) -> _StrategyWithPth:
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.strategy.__exit__(*exc)

    def __call__(self, wheel: Any, files: list[str], mapping: dict[str, str]) -> None:
        self.strategy(wheel, [f for f in files if not f.endswith(PTH_NAME)], mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("utf-8"))


class EditableWithPth(editable_wheel):
    def _select_strategy(self, *args: Any, **kwargs: Any) -> Any:  # setuptools >= 64
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth})
