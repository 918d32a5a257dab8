"""compressed-tensors checkpoints (llm-compressor's and scoutq's own), weight-only schemes.

Storage (quantized-formats.md B1, B2):

    pack-quantized   M.weight_packed int32, M.weight_scale, M.weight_zero_point (asymmetric,
                     packed along the output dim), M.weight_shape, M.weight_g_idx (actorder group)
    naive-quantized  M.weight int8 [out, in] unpacked, M.weight_scale, M.weight_zero_point
                     (asymmetric, unpacked [out, groups]), M.weight_g_idx (actorder group)

A weight whose groups run in order (no `weight_g_idx`, or one equal to i // group_size) becomes a
PackedWeight as stored; one with act-order groups is dequantized with each input column's own
group, w[o, i] = (q[o, i] - z[o, g[i]]) * s[o, g[i]] in the scale's dtype (elementwise, so the
same bits as the decompressor's permute-dequantize-unpermute).
"""

from __future__ import annotations

from typing import Any

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import CheckpointError
from scoutq.foreign import ModuleWeight, WeightSource
from scoutq.quant import primitives
from scoutq.quant.ct_schema import QuantGroup, group_for, parse_quantization_config
from scoutq.quant.packed import PackedWeight
from scoutq.quant.scheme import Scheme


def in_order(g_idx: torch.Tensor, group_size: int | None) -> bool:
    """Whether `g_idx` is the plain i // group_size (groups contiguous, in order)."""
    columns = g_idx.numel()
    expected = torch.zeros(columns, dtype=torch.int64) if group_size is None else \
        torch.arange(columns, dtype=torch.int64) // group_size
    return bool(torch.equal(g_idx.to(torch.int64), expected))


def dequantize_by_column_group(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                               g_idx: torch.Tensor) -> torch.Tensor:
    """w[o, i] = (q[o, i] - z[o, g[i]]) * s[o, g[i]], in the scale's dtype (q, z: signed int8)."""
    columns = g_idx.to(torch.int64)
    values = q.to(scale.dtype)
    if zero_point is not None:
        values = values - zero_point.to(scale.dtype)[:, columns]
    return values * scale[:, columns]


class CompressedTensorsSource(WeightSource):
    def __init__(self, checkpoint: Checkpoint, qconfig: dict[str, Any]):
        super().__init__(checkpoint, qconfig)
        status = qconfig.get("quantization_status", "compressed")
        if status != "compressed":
            raise self.refuse("quantization_status", status, "only compressed checkpoints store quantized weights")
        self.groups, self.ignore = parse_quantization_config(self.config_path, qconfig, foreign=True)
        described = sorted({f"{g.scheme.describe()}{' per-tensor' if g.per_tensor else ''} ({g.format})"
                            for g in self.groups})
        self.format = f"compressed-tensors {', '.join(described)}"

    def group(self, module: str) -> QuantGroup | None:
        return group_for(module, self.groups, self.ignore, self.config_path)

    def _read(self, module: str, suffix: str) -> torch.Tensor | None:
        key = f"{module}.{suffix}"
        return self.checkpoint.read(key) if key in self.checkpoint.tensors else None

    def decode(self, module: str) -> ModuleWeight | None:
        group = self.group(module)
        if group is None:
            return None
        scheme, directory = group.scheme, self.checkpoint.directory
        plain = Scheme(scheme.bits, scheme.group_size, scheme.symmetric)  # the packed kernels take int4 and int8
        g_idx = self._read(module, "weight_g_idx")
        grouped_in_order = g_idx is None or in_order(g_idx, scheme.group_size)
        scale = self._read(module, "weight_scale")
        if scale is None:
            raise CheckpointError(f"{directory}: module {module!r} is quantized by {group.name} but has no weight_scale")
        if group.format == "pack-quantized":
            packed, shape = self._read(module, "weight_packed"), self._read(module, "weight_shape")
            if packed is None or shape is None:
                missing = "weight_packed" if packed is None else "weight_shape"
                raise CheckpointError(f"{directory}: module {module!r} is quantized by {group.name} but has no {missing}")
            out_features, in_features = (int(v) for v in shape.tolist())
            if not group.per_tensor and scale.numel() != out_features * scheme.groups(in_features):
                raise ValueError(f"weight_scale {list(scale.shape)} does not fit weight_shape "
                                 f"[{out_features}, {in_features}] in {scheme.describe()}")
            stored_zero = self._read(module, "weight_zero_point")
            zero = None if scheme.symmetric or stored_zero is None else \
                primitives.unpack_zero_point(stored_zero, scheme.bits, out_features)
            if grouped_in_order and not group.per_tensor and (zero is not None or scheme.symmetric):
                # The stored words are already scoutq's packing: kept as they are, not unpacked.
                return PackedWeight(plain, packed, scale.reshape(out_features, -1), zero, (out_features, in_features))
            q = primitives.unpack_int32(packed, scheme.bits, in_features)
        else:  # naive-/int-quantized: the integers as they are, under M.weight
            q = self._read(module, "weight")
            if q is None or q.dtype != torch.int8:
                raise CheckpointError(f"{directory}: module {module!r} ({group.format}) needs an int8 weight")
            stored_zero = self._read(module, "weight_zero_point")
            zero = None if scheme.symmetric or stored_zero is None else stored_zero.to(torch.int8)
        if not scheme.symmetric and zero is None:
            raise CheckpointError(f"{directory}: module {module!r} is asymmetric ({group.name}) but has no "
                                  "weight_zero_point")
        out_features = q.shape[0]
        if group.per_tensor:  # one scale for every row: the channel layout holds it exactly
            scale = scale.reshape(1, 1).expand(out_features, 1).contiguous()
            zero = None if zero is None else zero.reshape(1, 1).expand(out_features, 1).contiguous()
        scale = scale.reshape(out_features, -1)
        if not grouped_in_order:
            return dequantize_by_column_group(q, scale, zero, g_idx)  # type: ignore[arg-type]
        return PackedWeight.from_quantized(q, scale, zero, plain)
