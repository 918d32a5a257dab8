"""Pure quantization primitives: qparams, quantize, dequantize, pack, unpack.

No modules, no I/O. Conventions (those of compressed-tensors `pack-quantized`, so that its
decompressor and vLLM read scoutq's output; quantized-formats.md B1):

* Weights are 2-D nn.Linear [out, in]; groups run along `in`. Quantized values are signed,
  q in [-2^(b-1), 2^(b-1) - 1], and w ~ (q - zero_point) * scale.
* Scales are stored in the weight's own dtype (bf16 for Scout). Quantization divides by the
  *stored* scale, so that dequantizing the stored tensors reproduces exactly what was meant.
* Symmetric: scale = absmax / ((qmax - qmin) / 2), i.e. absmax / 7.5 for int4 (the value
  compressed-tensors and llm-compressor use); no zero point is stored.
* Signed symmetric scales (opt-in, `signed=True`): scale = e / qmin, e the group's value of
  largest magnitude, so e lands exactly on qmin (-8) and the grid is absmax / 8, not / 7.5.
  The scale is negative when e is positive. The stored format is the same (dequantize is
  q * scale, whatever the sign); ggml's Q4_0 picks its scales the same way (`max / -8`).
* Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [qmin, qmax]; the zero point is an
  integer in the same signed range.
* Packing: 32 / bits values per int32 along the last dim, least-significant bits first, each
  value offset by 2^(b-1) to be unsigned. Zero points are packed along dim 0 (the output dim).

Every function has a slow, obvious twin in reference.py; tests hold these to bit-exactness.
"""

from __future__ import annotations

import sys

import torch

from scoutq.quant.scheme import Scheme

if sys.byteorder != "little":  # packing reinterprets bytes as int32 words
    raise ImportError("scoutq's int32 packing assumes a little-endian machine")


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """View [out, in] as [out, groups, group_size] (groups = 1 for per-channel)."""
    out_features, in_features = w.shape
    size = in_features if scheme.group_size is None else scheme.group_size
    if in_features % size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {size}")
    return w.reshape(out_features, in_features // size, size)


def compute_qparams(
    w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales (and zero points) from each group's range.

    Args:
        w: weight [out, in], any float dtype (read in fp32).
        scheme: bits, group size, symmetry.
        scale_dtype: dtype the scales are stored in (the source weight's dtype).
        signed: symmetric schemes only: the group's largest-magnitude value maps to qmin
            (`signed_scale`); ignored for asymmetric ones, whose zero point places the range.

    Returns:
        scale [out, groups] in scale_dtype, never zero or infinite; zero_point [out, groups]
        int8 for asymmetric schemes, else None.
    """
    grouped = _grouped(w.float(), scheme)
    return qparams_from_range(grouped.amin(dim=-1), grouped.amax(dim=-1), scheme, scale_dtype, signed)


def qparams_from_range(
    low: torch.Tensor, high: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """compute_qparams from each group's minimum and maximum (fp32, any shape), for callers
    that have the ranges already: the fused RTN kernels (which torch.compile traces through
    this) and the clipping search (shrunk ranges). scheme.group_size is not used.

    Returns scale in scale_dtype and zero_point int8 (asymmetric schemes, else None), shaped
    like low.
    """
    tiny = torch.finfo(scale_dtype).tiny  # an all-zero group still gets a usable scale
    if scheme.symmetric and signed:
        return signed_scale(low, high, scheme.qmin, scale_dtype), None
    if scheme.symmetric:
        absmax = torch.maximum(low.abs(), high.abs())
        return (absmax / ((scheme.qmax - scheme.qmin) / 2)).clamp_min(tiny).to(scale_dtype), None
    low, high = low.clamp_max(0), high.clamp_min(0)
    scale = ((high - low) / (scheme.qmax - scheme.qmin)).clamp_min(tiny).to(scale_dtype)
    zero_point = torch.round(scheme.qmin - low / scale.float()).clamp(scheme.qmin, scheme.qmax)
    return scale, zero_point.to(torch.int8)


def signed_scale(low: torch.Tensor, high: torch.Tensor, qmin: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scales that put each group's largest-magnitude value exactly on qmin.

    With scale = absmax / 7.5 (int4) the extreme value rounds to -8 on the negative side but is
    clipped to 7 on the positive side, and the step is absmax / 7.5. Giving the scale the sign
    that sends the extreme to qmin uses all 16 levels on the side that needs them: the step is
    absmax / 8 and the extreme is exact. A tie (|low| == high) keeps the scale positive.

    Args:
        low, high: each group's minimum and maximum (fp32), same shape.
        qmin: the scheme's lowest level (-8 for int4, -128 for int8).
    Returns the scales in scale_dtype, magnitude at least the dtype's smallest normal number.
    """
    tiny = torch.finfo(scale_dtype).tiny
    negative_extreme = low.abs() >= high.abs()
    magnitude = (torch.maximum(low.abs(), high.abs()) / -qmin).clamp_min(tiny)
    return torch.where(negative_extreme, magnitude, -magnitude).to(scale_dtype)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme
) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero_point) as int8 [out, in], computed in fp32."""
    grouped = _grouped(w.float(), scheme)
    scaled = grouped / scale.float().unsqueeze(-1)
    if zero_point is not None:
        scaled += zero_point.float().unsqueeze(-1)
    return torch.round(scaled).clamp_(scheme.qmin, scheme.qmax).to(torch.int8).reshape(w.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme
) -> torch.Tensor:
    """w = (q - zero_point) * scale, in the scale's dtype: the same arithmetic, in the same
    order and dtype, as compressed-tensors' decompressor, so both give identical bits."""
    grouped = _grouped(q, scheme).to(scale.dtype)
    if zero_point is not None:
        grouped = grouped - zero_point.to(scale.dtype).unsqueeze(-1)
    return (grouped * scale.unsqueeze(-1)).reshape(q.shape)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed int8 values [rows, cols] into int32 [rows, ceil(cols * bits / 32)] along the last dim.

    Offset to unsigned, then for 4 bits two values per byte (even column in the low nibble);
    the bytes of each row, read as little-endian int32 words, are exactly the packed words.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    rows, cols = q.shape
    unsigned = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    per_word = 32 // bits
    if cols % per_word:  # a partial last word is filled with zero bits, as compressed-tensors does
        unsigned = torch.nn.functional.pad(unsigned, (0, per_word - cols % per_word))
        cols = unsigned.shape[1]
    if bits == 4:
        pairs = unsigned.view(rows, cols // 2, 2)
        unsigned = pairs[..., 0] | (pairs[..., 1] << 4)
    return unsigned.contiguous().reshape(-1).view(torch.int32).reshape(rows, -1)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 [rows, words] -> signed int8 [rows, cols]."""
    rows = packed.shape[0]
    data = packed.contiguous().reshape(-1).view(torch.uint8).reshape(rows, -1)
    if bits == 4:
        data = torch.stack((data & 0x0F, data >> 4), dim=-1).flatten(-2)
    elif bits != 8:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return (data[:, :cols].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack_zero_point(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [out, groups] packed along dim 0: int32 [out * bits / 32, groups]."""
    return pack_int32(zero_point.t().contiguous(), bits).t().contiguous()


def unpack_zero_point(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_int32(packed.t().contiguous(), bits, out_features).t().contiguous()
