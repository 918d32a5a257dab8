"""scoutq: quantize and evaluate Llama 4 mixture-of-experts checkpoints, shard by shard."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import scoutq.harness.hook` (run at every interpreter start by the lm-eval
    # plug-in's .pth file) does not import torch.
    if name == "load_model":
        from scoutq.model.load import load_model

        return load_model
    raise AttributeError(f"module 'scoutq' has no attribute {name!r}")
