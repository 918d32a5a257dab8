"""bitsandbytes checkpoints as transformers serializes them (quantized-formats.md B7).

4-bit (nf4 or fp4), for a Linear M:

    M.weight                                  uint8 [out * in / 2, 1]  two codes per byte
    M.weight.absmax, M.weight.quant_map       block scales and the 16-value code book
    M.weight.nested_absmax, .nested_quant_map double quantization of absmax (optional)
    M.weight.quant_state.bitsandbytes__nf4    uint8 JSON: blocksize, dtype, shape (or __fp4)

8-bit (LLM.int8): M.weight int8 [out, in] and M.SCB fp32 [out], w = q * SCB / 127.

Both are decoded by bitsandbytes itself (`QuantState.from_dict` + `dequantize_4bit`,
`int8_vectorwise_dequant`), so the dense weight is the bits its own runtime multiplies by.
"""

from __future__ import annotations

from typing import Any

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ConfigError
from scoutq.foreign import ModuleWeight, WeightSource

STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class BitsAndBytesSource(WeightSource):
    def __init__(self, checkpoint: Checkpoint, qconfig: dict[str, Any]):
        super().__init__(checkpoint, qconfig)
        try:
            import bitsandbytes.functional  # noqa: F401
        except ImportError:
            raise ConfigError(f"{self.config_path}: a bitsandbytes checkpoint needs the bitsandbytes package "
                              "(pip install 'scoutq[bnb]')") from None
        self.four_bit = bool(qconfig.get("load_in_4bit"))
        if not self.four_bit and not qconfig.get("load_in_8bit"):
            raise self.refuse("load_in_4bit", qconfig.get("load_in_4bit"), "neither 4-bit nor 8-bit is set")
        kind = str(qconfig.get("bnb_4bit_quant_type", "fp4"))
        if self.four_bit and kind not in ("nf4", "fp4"):
            raise self.refuse("bnb_4bit_quant_type", kind, "expected nf4 or fp4")
        double = ", double quant" if qconfig.get("bnb_4bit_use_double_quant") else ""
        self.format = f"bitsandbytes {kind}{double}" if self.four_bit else "bitsandbytes LLM.int8"

    def decode(self, module: str) -> ModuleWeight | None:
        tensors = self.checkpoint.tensors
        if self.four_bit:
            blob = next((key for key in tensors if key.startswith(f"{module}.weight.quant_state.bitsandbytes__")),
                        None)
            return None if blob is None else self._four_bit(module, blob)
        if f"{module}.SCB" not in tensors:
            return None
        import bitsandbytes.functional as bnb_functional

        q, row_scale = self.checkpoint.read(f"{module}.weight"), self.checkpoint.read(f"{module}.SCB")
        return bnb_functional.int8_vectorwise_dequant(q, row_scale.float())

    def _four_bit(self, module: str, blob: str) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        prefix = f"{module}.weight."
        state = {blob.removeprefix(prefix): self.checkpoint.read(blob)}
        for suffix in STATE_SUFFIXES:
            if prefix + suffix in self.checkpoint.tensors:
                state[suffix] = self.checkpoint.read(prefix + suffix)
        quant_state = bnb_functional.QuantState.from_dict(state, device=torch.device("cpu"))
        return bnb_functional.dequantize_4bit(self.checkpoint.read(f"{module}.weight"), quant_state)
