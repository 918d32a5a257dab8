"""The one stored format scoutq writes: compressed-tensors `pack-quantized` weights.

A quantized nn.Linear `M` becomes (quantized-formats.md B1):

    M.weight_packed      int32 [out, ceil(in * bits / 32)]
    M.weight_scale       source dtype [out, groups]   (groups = 1 per channel)
    M.weight_zero_point  int32 [ceil(out * bits / 32), groups]   (asymmetric only)
    M.weight_shape       int64 [2] = [out, in]

int8 per-channel and int4 group-wise share this layout; only bits and groups differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoutq.quant import primitives
from scoutq.quant.scheme import Scheme

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def packed_shapes(out_features: int, in_features: int, scheme: Scheme) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and safetensors dtype of every stored tensor, given the source dtype 'SRC'."""
    words = -(-in_features * scheme.bits // 32)
    groups = scheme.groups(in_features)
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "weight_packed": ((out_features, words), "I32"),
        "weight_scale": ((out_features, groups), "SRC"),
    }
    if not scheme.symmetric:
        shapes["weight_zero_point"] = ((-(-out_features * scheme.bits // 32), groups), "I32")
    shapes["weight_shape"] = ((2,), "I64")
    return shapes


@dataclass
class PackedWeight:
    scheme: Scheme
    packed: torch.Tensor  # int32 [out, words]
    scale: torch.Tensor  # [out, groups], source dtype
    zero_point: torch.Tensor | None  # int8 [out, groups], asymmetric only
    shape: tuple[int, int]

    @classmethod
    def from_quantized(
        cls, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme
    ) -> PackedWeight:
        out_features, in_features = q.shape
        return cls(scheme, primitives.pack_int32(q, scheme.bits), scale, zero_point, (out_features, in_features))

    def unpacked(self) -> torch.Tensor:
        """The signed int8 values [out, in]."""
        return primitives.unpack_int32(self.packed, self.scheme.bits, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The dense weight [out, in] in the scale's dtype, bit-identical to compressed-tensors'."""
        return primitives.dequantize(self.unpacked(), self.scale, self.zero_point, self.scheme)

    def reconstructed(self) -> torch.Tensor:
        """The fp32 weight a runtime computes with. compressed-tensors dequantizes in the scale's
        dtype; a ggml block (Scheme.ggml) multiplies its fp16 step in fp32, which is exact."""
        if self.scheme.ggml is None:
            return self.dequantize().float()
        zero = None if self.zero_point is None else self.zero_point
        return primitives.dequantize(self.unpacked(), self.scale.float(), zero, self.scheme)

    def to(self, device: torch.device | str) -> PackedWeight:
        """The same weight with its tensors on `device` (bits unchanged)."""
        zero = None if self.zero_point is None else self.zero_point.to(device)
        return PackedWeight(self.scheme, self.packed.to(device), self.scale.to(device), zero, self.shape)

    def state(self) -> dict[str, torch.Tensor]:
        """Stored tensors by suffix, in file order."""
        tensors = {"weight_packed": self.packed, "weight_scale": self.scale}
        if self.zero_point is not None:
            tensors["weight_zero_point"] = primitives.pack_zero_point(self.zero_point, self.scheme.bits)
        tensors["weight_shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return tensors

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], scheme: Scheme) -> PackedWeight:
        out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
        zero_point = None
        if not scheme.symmetric:
            zero_point = primitives.unpack_zero_point(tensors["weight_zero_point"], scheme.bits, out_features)
        return cls(scheme, tensors["weight_packed"], tensors["weight_scale"], zero_point, (out_features, in_features))
