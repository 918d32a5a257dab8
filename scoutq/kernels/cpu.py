"""PyTorch's packed CPU kernels, fed what they need.

int4, group-wise: `_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)` computes
w = (u - 8) * scale + zero for unsigned nibbles u. scoutq's w = (q - z) * scale with
q = u - 8, so zero = -z * scale (0 when symmetric). Group sizes 32, 64, 128 and 256.

int8, per channel: `_weight_int8pack_mm(x, q, scale)` computes x @ (q * scale).T. With a zero
point, x @ ((q - z) * s).T = (x @ (q * s).T) - (x . 1) * (z * s), a rank-one correction.

Both kernels want bf16 activations; fp32 activations are cast in and the result cast back.

int4 weights whose groups are multiples of 64 go to scoutq's own kernel (native.py) where the
CPU and compiler allow; PyTorch's int4 kernel is the fallback.

Those packed kernels unpack every weight again for every few tokens, so their time grows with
the token count. From a measured crossover on (TILES_FROM_TOKENS) a call goes instead to
dequantized fp32 tiles feeding a GEMM (tiles.py), whose dequantization is paid once per call:
`TokenDispatch` picks by the number of rows it is given, which for a routed expert is the
number of tokens routed to it.
"""

from __future__ import annotations

import torch

from scoutq.kernels import native, tiles
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
    """PyTorch's `_weight_int8pack_mm`, which has a CUDA kernel too: `device` places the weight
    (the cuda backend's int8 Linears use this same class on a GPU)."""

    def __init__(self, weight: PackedWeight, device: torch.device | str = "cpu"):
        self.out_features, self.in_features = weight.shape
        self.q = weight.unpacked().to(device).contiguous()
        self.scale = weight.scale.view(-1).to(device=device, dtype=torch.bfloat16)
        self.offset = None
        if weight.zero_point is not None:
            self.offset = (weight.zero_point.view(-1).float() * weight.scale.view(-1).float()).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)
        if self.offset is not None:
            y = (y.float() - x.float().sum(-1, keepdim=True) * self.offset).to(y.dtype)
        return y.to(x.dtype)


# From how many tokens (rows of x) the tile path is faster than the packed kernel, per bits.
# Measured by `scoutq bench crossover` (one Scout expert projection W [8192, 5120], 2 threads,
# median of 7) on the 2-core development machine (AVX-512F, no AVX-512 BF16), 2026-12-03, in ms
# as packed / tiles:
#   int8 (Int8CpuMatmul):  16 tok 25.1 / 34.4   24 tok 22.2 / 42.9   32 tok 34.1 / 33.6
#                          48 tok 43.3 / 40.1    64 tok 59.4 / 55.5  128 tok 126.4 / 86.0
#   int4 (Int4CpuMatmul):  32 tok 27.1 / 34.8   48 tok 43.2 / 52.3   64 tok 84.7 / 71.1
#                         128 tok 114.3 / 85.7
# The tiles win from 32 (int8) and 64 (int4) tokens on and at every larger count measured.
# Where scoutq's AVX-512 BF16 kernel runs, the packed side is faster and its crossover higher:
# `scoutq bench crossover` prints it for that machine.
TILES_FROM_TOKENS = {4: 64, 8: 32}

# A weight whose fp32 form is at most this many bytes is kept dequantized in fp32 and multiplied
# densely. At that size the packed and tile kernels' fixed cost per call (casts, transposes,
# threads) exceeds a whole dense matmul, and the bytes are negligible: no weight of Scout is
# this small (the smallest quantized one, k_proj [1024, 5120], is 20 MB in fp32), while every
# weight of the tiny fixtures is. Measured on tiny-trained (w4a16-g128, 8 windows of 128
# tokens, fp32): a forward took 120 ms with the kernels, 78 ms with the bf16 source.
DENSE_BELOW_BYTES = 2 * 1024 * 1024


class DenseMatmul:
    """A small packed weight, dequantized once (the reference's values) and multiplied in fp32."""

    def __init__(self, weight: PackedWeight):
        self.out_features, self.in_features = weight.shape
        self.weight = weight.dequantize().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight).to(x.dtype)


class TokenDispatch:
    """The packed kernel for few tokens, the tile path from `tiles_from` tokens on."""

    def __init__(self, few: native.NativeInt4Matmul | Int4CpuMatmul | Int8CpuMatmul, many: tiles.DequantTileMatmul,
                 tiles_from: int):
        self.few, self.many, self.tiles_from = few, many, tiles_from
        self.out_features, self.in_features = few.out_features, few.in_features

    def method(self, tokens: int) -> str:
        """The kernel a call with `tokens` rows runs (for benchmarks and `scoutq run`)."""
        return "tiles" if tokens >= self.tiles_from else type(self.few).__name__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        return (self.many if rows >= self.tiles_from else self.few)(x)


def cpu_matmul(weight: PackedWeight) -> TokenDispatch | DenseMatmul | native.NativeInt4Matmul | Int4CpuMatmul | Int8CpuMatmul | ReferenceMatmul:
    """The fastest CPU kernels for the weight's scheme, dispatched by token count; a weight
    below DENSE_BELOW_BYTES in fp32 dense (the reference where no kernel applies)."""
    if weight.shape[0] * weight.shape[1] * 4 <= DENSE_BELOW_BYTES:
        return DenseMatmul(weight)
    few = packed_matmul(weight)
    if isinstance(few, ReferenceMatmul) or not tiles.supports(weight) or tiles.library() is None:
        return few
    return TokenDispatch(few, tiles.DequantTileMatmul(weight), TILES_FROM_TOKENS[weight.scheme.bits])


def packed_matmul(weight: PackedWeight) -> native.NativeInt4Matmul | Int4CpuMatmul | Int8CpuMatmul | ReferenceMatmul:
    """The fastest packed (few-token) CPU kernel for the weight's scheme (the reference where none applies)."""
    scheme = weight.scheme
    if native.supports(weight) and native.library() is not None:
        return native.NativeInt4Matmul(weight)
    if scheme.bits == 4 and (scheme.group_size or weight.shape[1]) in INT4_GROUPS:
        return Int4CpuMatmul(weight)
    if scheme.bits == 8 and scheme.group_size is None:
        return Int8CpuMatmul(weight)
    return ReferenceMatmul(weight)
