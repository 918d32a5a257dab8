"""AWQ checkpoints, GEMM packing (AutoAWQ; GPTQModel and AutoRound write the same layout).

Layout (AutoAWQ `awq/utils/packing_utils.py`, the same in GPTQModel's AWQ utilities), 4-bit, for a
Linear M with groups along the input:

    M.qweight  int32 [in, out / 8]       packed along the OUTPUT dim, in an interleaved order:
                                         field k (bits 4k...) of word c holds output 8c + ORDER[k],
                                         ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    M.qzeros   int32 [groups, out / 8]   zero points, packed the same way
    M.scales   fp16  [groups, out]

    w[o, i] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o]

AWQ always has zero points (unsigned 0..15); they become scoutq's asymmetric PackedWeight with
the same differences. GEMV, Marlin and ExLlama packings store other orders and are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import CheckpointError
from scoutq.foreign import ModuleWeight, WeightSource
from scoutq.foreign.gptq import packed_or_dense, unpack_columns

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output offset held by field k of a word


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] in AWQ's interleaved order -> unsigned values [R, 8 C] in output order (int16)."""
    fields = unpack_columns(words, 4)  # [R, 8 C]: field k of word c at column 8c + k
    rows, columns = fields.shape
    placed = torch.empty_like(fields)
    order = torch.tensor(ORDER)
    targets = (torch.arange(columns) // 8) * 8 + order.repeat(columns // 8)
    placed[:, targets] = fields
    return placed.view(rows, columns)


class AwqSource(WeightSource):
    def __init__(self, checkpoint: Checkpoint, qconfig: dict[str, Any]):
        super().__init__(checkpoint, qconfig)
        bits = qconfig.get("bits", qconfig.get("w_bit"))
        if bits != 4:
            raise self.refuse("bits", bits, "AWQ's GEMM packing is read for 4 bits")
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm" and "awq" not in str(qconfig.get("packing_format", "")):
            raise self.refuse("version", qconfig.get("version"), "only the GEMM packing is read")
        if qconfig.get("zero_point", True) is not True:
            raise self.refuse("zero_point", qconfig.get("zero_point"), "AWQ without zero points is not read")
        size = qconfig.get("group_size", qconfig.get("q_group_size", 128))
        if not isinstance(size, int) or size <= 0 or size % 8:
            raise self.refuse("group_size", size, "expected a positive multiple of 8")
        self.group_size = size
        self.format = f"AWQ int4-g{size} (GEMM packing, zero points)"

    def decode(self, module: str) -> ModuleWeight | None:
        if f"{module}.qweight" not in self.checkpoint.tensors:
            return None
        parts = {}
        for suffix in ("qweight", "qzeros", "scales"):
            key = f"{module}.{suffix}"
            if key not in self.checkpoint.tensors:
                raise CheckpointError(f"{self.checkpoint.directory}: module {module!r} has qweight but no {suffix}")
            parts[suffix] = self.checkpoint.read(key)
        q = unpack_awq(parts["qweight"]).t().contiguous()  # [out, in]
        zero = unpack_awq(parts["qzeros"]).t().contiguous()  # [out, groups]
        scale = parts["scales"].t().contiguous()
        in_features = q.shape[1]
        if in_features % self.group_size or scale.shape != zero.shape or scale.shape[0] != q.shape[0]:
            raise CheckpointError(f"{self.checkpoint.directory}: module {module!r}: qweight, qzeros and scales "
                                  "disagree on its shape")
        g_idx = torch.arange(in_features) // self.group_size
        return packed_or_dense(q, zero, scale, g_idx, 4, self.group_size)
