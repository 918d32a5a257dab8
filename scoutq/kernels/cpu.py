"""PyTorch's packed CPU kernels, fed what they need.

int4, group-wise: `_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)` computes
w = (u - 8) * scale + zero for unsigned nibbles u. scoutq's w = (q - z) * scale with
q = u - 8, so zero = -z * scale (0 when symmetric). Group sizes 32, 64, 128 and 256.

int8, per channel: `_weight_int8pack_mm(x, q, scale)` computes x @ (q * scale).T. With a zero
point, x @ ((q - z) * s).T = (x @ (q * s).T) - (x . 1) * (z * s), a rank-one correction.

Both kernels want bf16 activations; fp32 activations are cast in and the result cast back.

int4 weights whose groups are multiples of 64 go to scoutq's own kernel (native.py) where the
CPU and compiler allow; PyTorch's int4 kernel is the fallback.
"""

from __future__ import annotations

import torch

from scoutq.kernels import native
from scoutq.kernels.reference import ReferenceMatmul
from scoutq.quant.packed import PackedWeight

INT4_GROUPS = (32, 64, 128, 256)


class Int4CpuMatmul:
    def __init__(self, weight: PackedWeight):
        self.out_features, self.in_features = weight.shape
        self.group = weight.scheme.group_size or self.in_features
        unsigned = weight.unpacked().to(torch.int32) + 8
        self.packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        scale = weight.scale.float()
        zero = torch.zeros_like(scale) if weight.zero_point is None else -weight.zero_point.float() * scale
        self.scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.scales_and_zeros)
        return y.to(x.dtype)


class Int8CpuMatmul:
    def __init__(self, weight: PackedWeight):
        self.out_features, self.in_features = weight.shape
        self.q = weight.unpacked().contiguous()
        self.scale = weight.scale.view(-1).to(torch.bfloat16)
        self.offset = None
        if weight.zero_point is not None:
            self.offset = (weight.zero_point.view(-1).float() * weight.scale.view(-1).float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)
        if self.offset is not None:
            y = (y.float() - x.float().sum(-1, keepdim=True) * self.offset).to(y.dtype)
        return y.to(x.dtype)


def cpu_matmul(weight: PackedWeight) -> native.NativeInt4Matmul | Int4CpuMatmul | Int8CpuMatmul | ReferenceMatmul:
    """The fastest CPU kernel for the weight's scheme (the reference where none applies)."""
    scheme = weight.scheme
    if native.supports(weight) and native.library() is not None:
        return native.NativeInt4Matmul(weight)
    if scheme.bits == 4 and (scheme.group_size or weight.shape[1]) in INT4_GROUPS:
        return Int4CpuMatmul(weight)
    if scheme.bits == 8 and scheme.group_size is None:
        return Int8CpuMatmul(weight)
    return ReferenceMatmul(weight)
