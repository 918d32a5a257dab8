"""The oracle: dequantize on every call, then an ordinary matmul. Slow, obviously right."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scoutq.quant.packed import PackedWeight


class ReferenceMatmul:
    def __init__(self, weight: PackedWeight, device: torch.device | str = "cpu"):
        self.weight = PackedWeight(
            weight.scheme, weight.packed.to(device), weight.scale.to(device),
            None if weight.zero_point is None else weight.zero_point.to(device), weight.shape,
        )
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantized in the scale's dtype (bit-identical to compressed-tensors), then in x's dtype.
        return F.linear(x, self.weight.dequantize().to(x.dtype))
