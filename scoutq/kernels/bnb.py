"""bitsandbytes as a backend: the 4-bit (nf4, blocks of 64) and 8-bit (LLM.int8, threshold 0)
matmuls users know, re-quantized from scoutq's dequantized weight.

This is a different quantization of the same weight, so it matches the reference only to
within bitsandbytes' own quantization error (tests state the tolerance). scoutq's int4
weights map to nf4, int8 weights to LLM.int8.
"""

from __future__ import annotations

import torch

from scoutq.errors import ScoutqError
from scoutq.quant.packed import PackedWeight


def _bitsandbytes():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes
    except ImportError:
        raise ScoutqError("backend 'bnb' needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


class BnbMatmul:
    def __init__(self, weight: PackedWeight, device: torch.device | str = "cpu"):
        bnb = _bitsandbytes()
        self.out_features, self.in_features = weight.shape
        dense = weight.dequantize().to(device)
        self.bits = weight.scheme.bits
        if self.bits == 4:
            self.packed, self.state = bnb.functional.quantize_4bit(
                dense.to(torch.bfloat16), quant_type="nf4", blocksize=64)
        else:
            layer = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=False,
                                        has_fp16_weights=False, threshold=0.0)
            layer.weight = bnb.nn.Int8Params(dense.float(), requires_grad=False, has_fp16_weights=False)
            self.layer = layer.to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bitsandbytes()
        if self.bits == 4:
            return bnb.matmul_4bit(x.to(torch.bfloat16), self.packed.t(), quant_state=self.state).to(x.dtype)
        return self.layer(x).to(x.dtype)
