"""scoutq: quantize and evaluate Llama 4 mixture-of-experts checkpoints, shard by shard."""

from scoutq.model.load import load_model

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]
