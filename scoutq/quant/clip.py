"""Activation-aware clipping: per-group scales that minimise the output error, not the range.

Round-to-nearest takes each group's full range, so one outlier weight stretches the step for
the other 127. Shrinking the range clips the outlier but rounds everything else finer. Which
wins depends on how much each input channel matters to the output, and that is measured: the
output error of a row is sum_j E[x_j^2] (w_j - dq_j)^2 when input channels are uncorrelated,
so the error is weighted by the activation second moments E[x_j^2] of the calibration data
(the diagonal of X^T X / N). For each group, ratios 1, 1 - 1/grid, ... down to `min_ratio` of
the range are tried and the one with the smallest weighted error kept (ties keep the wider).
With `signed_scales` the range is that of primitives.signed_scale (the extreme value on
qmin), shrunk the same way.

The chosen scales are stored as usual; the result is a plain checkpoint. The arithmetic of
scales, quantize and dequantize is exactly primitives.py's, so the error measured here is the
error of the stored tensors.
"""

from __future__ import annotations

import torch

from scoutq.quant import primitives
from scoutq.quant.packed import PackedWeight
from scoutq.quant.scheme import Scheme
from scoutq.quant.settings import ClipSettings

ROW_BLOCK_ELEMENTS = 1 << 22  # weights per row block: bounds the [rows, groups, size] temporaries


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    out_features, in_features = w.shape
    size = scheme.group_size or in_features
    return w.float().reshape(out_features, in_features // size, size)


def weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, importance: torch.Tensor,
                   scheme: Scheme) -> torch.Tensor:
    """sum_j importance_j (w_j - dq_j)^2 per row and group [out, groups], dq as stored would give."""
    q = primitives.quantize(w, scale, zero, scheme)
    dq = primitives.dequantize(q, scale, zero, scheme).float()
    diff = _grouped(w, scheme) - _grouped(dq, scheme)
    return (diff.square() * importance.float().view(1, diff.shape[1], diff.shape[2])).sum(-1)


def search_qparams(
    w: torch.Tensor, importance: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype,
    options: ClipSettings = ClipSettings(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) [out, groups] minimising the importance-weighted error.

    Args:
        w: weight [out, in].
        importance: [in], non-negative; the activation second moments E[x_j^2].
        scheme, scale_dtype: as for primitives.compute_qparams.
    """
    out_features, in_features = w.shape
    step = max(1, ROW_BLOCK_ELEMENTS // in_features)
    scales, zeros = [], []
    for start in range(0, out_features, step):
        rows = w[start : start + step]
        grouped = _grouped(rows, scheme)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        best_scale = best_zero = best_error = None
        for ratio in options.ratios():
            scale, zero = primitives.qparams_from_range(low * ratio, high * ratio, scheme, scale_dtype,
                                                        options.signed_scales)
            error = weighted_error(rows, scale, zero, importance, scheme)
            if best_error is None:
                best_scale, best_zero, best_error = scale, zero, error
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            if zero is not None:
                best_zero = torch.where(better, zero, best_zero)  # type: ignore[arg-type]
        scales.append(best_scale)
        if best_zero is not None:
            zeros.append(best_zero)
    return torch.cat(scales), torch.cat(zeros) if zeros else None  # type: ignore[arg-type]


def clip_quantize(
    w: torch.Tensor, importance: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype | None = None,
    options: ClipSettings = ClipSettings(),
) -> PackedWeight:
    """Quantize an nn.Linear weight [out, in] with activation-aware clipped scales."""
    scale_dtype = scale_dtype or w.dtype
    scale, zero = search_qparams(w, importance, scheme, scale_dtype, options)
    q = primitives.quantize(w, scale, zero, scheme)
    return PackedWeight.from_quantized(q, scale, zero, scheme)
