"""Makes `lm_eval --model scoutq` work in any Python where scoutq is installed.

lm-evaluation-harness keeps its models in a registry filled by `lm_eval.models` and offers no
plug-in entry point for models, so scoutq installs `scoutq-lm-eval.pth` beside itself in
site-packages. Python runs that file's one line at start-up: `import scoutq.harness.hook`,
which only adds a finder to `sys.meta_path` (standard library only: no torch, no lm_eval).
When, and only when, a program imports `lm_eval.api.registry`, the finder lets the import run
and then registers "scoutq" as a lazy entry pointing at `scoutq.harness.lm:ScoutqLM`, after
the harness's own table (lm_eval's `get_model` fills that table only while the registry is
empty). scoutq's adapter is imported when a user asks for `--model scoutq`, never before.

Anything going wrong here is swallowed: a plug-in must never break an unrelated program.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

TARGET = "lm_eval.api.registry"
MODEL = ("scoutq", "scoutq.harness.lm:ScoutqLM")


def register(registry: ModuleType) -> None:
    """Add scoutq's lazy entry to a freshly imported lm_eval.api.registry."""
    try:
        import lm_eval.models  # noqa: F401 - the builtin table first (see the module docstring)

        models = registry.model_registry
        if MODEL[0] not in models:
            models.register(MODEL[0], target=MODEL[1])
    except Exception:  # noqa: BLE001 - never break the importing program; `--model scoutq` then says it is unknown
        pass


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader):
        self.wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        register(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    registry = sys.modules.get(TARGET)
    if registry is not None:  # lm_eval imported before us (a .pth earlier in the order is unlikely but possible)
        register(registry)
    else:
        sys.meta_path.insert(0, _Finder())


install()
