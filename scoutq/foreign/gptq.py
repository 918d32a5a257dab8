"""GPTQ checkpoints (AutoGPTQ / GPTQModel, and AutoRound's `auto_round:auto_gptq` packing).

Layout (quantized-formats.md B5, from GPTQModel's `nn_modules/qlinear` and `utils/model.py`), for a
Linear M with `in` inputs, `out` outputs and b bits (4 or 8), groups along the input:

    M.qweight  int32 [in * b / 32, out]   packed along the input: word r of column o holds inputs
                                          (32/b) r ... (32/b) r + 32/b - 1, the first in the lowest bits;
                                          unsigned values q in [0, 2^b)
    M.qzeros   int32 [groups, out * b / 32]  zero points, packed along the output the same way
    M.scales   fp16  [groups, out]
    M.g_idx    int32 [in]                 the group of each input (i // group_size unless desc_act)

    w[o, i] = (q[i, o] - z[g[i], o]) * s[g[i], o]

`checkpoint_format: gptq` (v1, the default) stores every zero point minus one; GPTQModel turns v1
into v2 by adding 0x11111111 (4-bit) or 0x01010101 (8-bit) to each qzeros word, and so does this
reader, carries included, so the zero points are the ones GPTQModel computes with. GPTQModel's
`dynamic` overrides (`-:PATTERN` unquantized, `+:PATTERN` own bits / group_size) are applied per
module. Groups in order
become a PackedWeight (q - 2^(b-1) and z - 2^(b-1) in scoutq's signed convention: the same
differences); act-order groups are dequantized densely in fp16, as GPTQModel's torch kernel does.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import CheckpointError
from scoutq.foreign import ModuleWeight, WeightSource
from scoutq.foreign.ct import dequantize_by_column_group, in_order
from scoutq.quant.packed import PackedWeight
from scoutq.quant.scheme import Scheme

V1_TO_V2 = {4: 0x11111111, 8: 0x01010101}  # +1 in every field of a qzeros word


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] with 32/b fields per word, lowest first -> unsigned values [R * 32/b, C] (int16):
    field k of word r is row (32/b) r + k."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [R, 32/b, C]
    return fields.reshape(-1, words.shape[1]).to(torch.int16)


def unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along the columns -> unsigned values [R, C * 32/b] (int16)."""
    return unpack_rows(words.t().contiguous(), bits).t().contiguous()


def packed_or_dense(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor, bits: int,
                    group_size: int | None) -> ModuleWeight:
    """The weight from unsigned q [out, in], zero points [out, groups] and scales [out, groups]:
    a PackedWeight when groups run in order and every zero point fits b bits, else dense."""
    if zero.shape != scale.shape or q.shape[0] != scale.shape[0]:
        raise ValueError(f"zero points {list(zero.shape)} and scales {list(scale.shape)} (as [out, groups]) do not "
                         f"fit a weight of {list(q.shape)}")
    if g_idx.numel() != q.shape[1] or int(g_idx.min()) < 0 or int(g_idx.max()) >= scale.shape[1]:
        raise ValueError(f"g_idx names groups outside the {scale.shape[1]} stored")
    offset = 1 << (bits - 1)
    signed_zero = zero - offset
    fits = bool(((signed_zero >= -offset) & (signed_zero < offset)).all())
    if not fits or not in_order(g_idx, group_size):
        return dequantize_by_column_group(q - offset, scale, signed_zero, g_idx)
    signed_q = (q - offset).to(torch.int8)
    if bool((signed_zero == 0).all()):  # symmetric: every zero point is the midpoint
        return PackedWeight.from_quantized(signed_q, scale, None, Scheme(bits, group_size, True))
    return PackedWeight.from_quantized(signed_q, scale, signed_zero.to(torch.int8), Scheme(bits, group_size, False))


class GptqSource(WeightSource):
    def __init__(self, checkpoint: Checkpoint, qconfig: dict[str, Any]):
        super().__init__(checkpoint, qconfig)
        self.bits = qconfig.get("bits")
        if self.bits not in (4, 8):
            raise self.refuse("bits", self.bits, "scoutq reads 4- and 8-bit GPTQ weights")
        pack_dtype = qconfig.get("pack_dtype", "int32")
        if pack_dtype not in ("int32", "torch.int32"):
            raise self.refuse("pack_dtype", pack_dtype, "only int32 words are read")
        size = qconfig.get("group_size", 128)
        if not isinstance(size, int) or (size != -1 and (size <= 0 or size % 8)):
            raise self.refuse("group_size", size, "expected -1 or a positive multiple of 8")
        self.group_size = None if size == -1 else size
        # Without the field the checkpoint is v1, AutoRound's auto_gptq packing included.
        self.checkpoint_format = str(qconfig.get("checkpoint_format", "gptq"))
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise self.refuse("checkpoint_format", self.checkpoint_format, "expected 'gptq' (v1) or 'gptq_v2'")
        zeros = "v1 zero points" if self.checkpoint_format == "gptq" else "v2 zero points"
        granularity = "channel" if self.group_size is None else f"g{self.group_size}"
        order = ", desc_act" if qconfig.get("desc_act") else ""
        self.dynamic = self._dynamic(qconfig.get("dynamic") or {})
        overrides = f", {len(self.dynamic)} per-module overrides" if self.dynamic else ""
        self.format = f"GPTQ int{self.bits}-{granularity} ({zeros}{order}{overrides})"

    def _dynamic(self, dynamic: Any) -> list[tuple[re.Pattern[str], dict[str, Any] | None]]:
        """GPTQModel's per-module overrides: `-:PATTERN` keeps matching modules unquantized,
        `+:PATTERN` (or a bare pattern) gives them their own bits / group_size; first match wins,
        re.match on the module name as GPTQModel matches it."""
        if not isinstance(dynamic, dict):
            raise self.refuse("dynamic", dynamic, "expected an object of pattern -> overrides")
        rules = []
        for key, override in dynamic.items():
            skip = key.startswith("-:")
            try:
                pattern = re.compile(key[2:] if key.startswith(("-:", "+:")) else key)
            except re.error as bad:
                raise self.refuse(f"dynamic[{key!r}]", key, f"not a regular expression ({bad})") from None
            if not skip:
                if not isinstance(override, dict):
                    raise self.refuse(f"dynamic[{key!r}]", override, "expected an object of overrides")
                unknown = set(override) - {"bits", "group_size", "sym", "desc_act", "damp_percent", "mse"}
                if unknown:
                    field = sorted(unknown)[0]
                    raise self.refuse(f"dynamic[{key!r}].{field}", override[field], "not a field scoutq reads")
                if override.get("bits", self.bits) not in (4, 8):
                    raise self.refuse(f"dynamic[{key!r}].bits", override["bits"], "scoutq reads 4- and 8-bit weights")
            rules.append((pattern, None if skip else override))
        return rules

    def settings(self, module: str) -> tuple[int, int | None]:
        """(bits, group size) of a quantized module, after the `dynamic` overrides."""
        for pattern, override in self.dynamic:
            if pattern.match(module):
                if override is None:
                    raise CheckpointError(f"{self.checkpoint.directory}: module {module!r} has a qweight, but "
                                          f"quantization_config.dynamic excludes it ({pattern.pattern!r})")
                size = override.get("group_size", -1 if self.group_size is None else self.group_size)
                return int(override.get("bits", self.bits)), None if size == -1 else int(size)
        return self.bits, self.group_size

    def _tensor(self, module: str, suffix: str) -> torch.Tensor:
        key = f"{module}.{suffix}"
        if key not in self.checkpoint.tensors:
            raise CheckpointError(f"{self.checkpoint.directory}: module {module!r} has qweight but no {suffix}")
        return self.checkpoint.read(key)

    def decode(self, module: str) -> ModuleWeight | None:
        if f"{module}.qweight" not in self.checkpoint.tensors:
            return None
        if f"{module}.bias" in self.checkpoint.tensors:
            raise CheckpointError(f"{self.checkpoint.directory}: module {module!r} has a bias; Llama 4's Linears have none")
        bits, group_size = self.settings(module)
        words = self._tensor(module, "qweight")
        q = unpack_rows(words, bits).t().contiguous()  # [out, in]
        out_features, in_features = q.shape
        zero_words = self._tensor(module, "qzeros")
        if self.checkpoint_format == "gptq":
            zero_words = zero_words + V1_TO_V2[bits]  # int32 arithmetic wraps, as GPTQModel's does
        zero = unpack_columns(zero_words, bits)[:, :out_features].t().contiguous()  # [out, groups]
        scale = self._tensor(module, "scales").t().contiguous()  # [out, groups]
        key = f"{module}.g_idx"
        g_idx = self.checkpoint.read(key) if key in self.checkpoint.tensors else \
            torch.arange(in_features) // (group_size or in_features)
        if g_idx.numel() != in_features or scale.shape[0] != out_features:
            raise CheckpointError(f"{self.checkpoint.directory}: module {module!r}: qweight, scales and g_idx "
                                  "disagree on its shape (check bits and quantization_config.dynamic)")
        return packed_or_dense(q, zero, scale, g_idx, bits, group_size)
