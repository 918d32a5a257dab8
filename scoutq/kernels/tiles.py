"""The many-token CPU path: dequantized tiles feeding an fp32 GEMM (`scoutq_tiles::dequant_matmul`).

A packed kernel (PyTorch's int4 / int8 CPU kernels, scoutq's AVX-512 BF16 one) unpacks every
weight again for every few tokens, so its time grows with the token count; a dense GEMM reads
each weight once for all tokens. This path dequantizes W a tile of rows at a time into an
fp32 buffer that stays in cache (TILE_BYTES) and multiplies each tile with all the tokens at
once (dequant_tiles.cpp). cpu.py sends an expert's tokens here from a measured crossover on.

The op is built on first use like native.py's (torch.utils.cpp_extension, the user's cache),
for the CPU it runs on (`-march=native`); without a compiler or ninja, or with
`SCOUTQ_NATIVE=0`, `library()` is None with the reason in `status()`, and the packed kernels
serve every token count.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scoutq.kernels import native
from scoutq.quant.packed import PackedWeight

SOURCE = Path(__file__).with_name("dequant_tiles.cpp")
NAME = "scoutq_dequant_tiles"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
TILE_BYTES = 1024 * 1024  # an fp32 tile of this size stays in a core's L2 while its GEMM reads it

def _build() -> torch._ops.OpOverloadPacket:
    native.load_extension(NAME, SOURCE, CFLAGS)
    return torch.ops.scoutq_tiles.dequant_matmul


_TILES = native.ExtensionOp(NAME, "tile kernel", native._toolchain_problem, _build, "dequant-tiles")
library = _TILES.op  # the op `torch.ops.scoutq_tiles.dequant_matmul`, or None (see `status()` for why)
status = _TILES.status


def supports(weight: PackedWeight) -> bool:
    group = weight.scheme.group_size or weight.shape[1]
    return weight.shape[1] % group == 0 and group % 2 == 0


class DequantTileMatmul:
    """A PackedWeight multiplied as fp32 tiles; reads the stored pack layout as it is (no copy)."""

    def __init__(self, weight: PackedWeight):
        op = library()
        if op is None or not supports(weight):
            raise ValueError(f"the tile kernel cannot run this weight ({status()})")
        self._op = op
        self.out_features, self.in_features = weight.shape
        self.bits = weight.scheme.bits
        self.group = weight.scheme.group_size or self.in_features
        row_bytes = self.in_features * self.bits // 8
        self.packed = weight.packed.contiguous().view(torch.uint8)[:, :row_bytes].contiguous()
        self.scales = weight.scale.float().contiguous()
        self.zeros = None if weight.zero_point is None else weight.zero_point.float().contiguous()
        self.tile_rows = max(8, TILE_BYTES // (self.in_features * 4))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        y = self._op(rows, self.packed, self.scales, self.zeros, self.bits, self.group, self.tile_rows)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
