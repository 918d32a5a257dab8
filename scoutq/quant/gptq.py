"""GPTQ: quantize one column at a time and push each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

For a Linear with weight W [out, in] and calibration inputs X [N, in], the output error of a
quantized Q is ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X. Rows are
independent; within a row, after column j is rounded, the remaining columns are re-solved so
that the error from j is compensated by the ones that follow. With U the upper Cholesky factor
of H^-1, that update is

    err_j = (w_j - dq_j) / U[j, j];   w_{j+1:} -= err_j * U[j, j+1:]

Blocked (Frantar et al. §3 "lazy batch updates"): the rank-one updates stay inside a block of
`block_size` columns, and the block's accumulated error reaches the rest of the matrix in one
matmul. Options:

* damp: `damp * mean(diag H)` is added to the diagonal, which keeps the Cholesky factorisation
  well conditioned when inputs are few or collinear (rare experts).
* act_order: columns are processed in decreasing order of H's diagonal (the most active
  inputs first). Group scales are then fixed up front from the original weights ("static
  groups"), so each stored group still covers consecutive input columns: the stored format
  is plain pack-quantized, with no g_idx permutation for runtimes to honour.
* mse_scales: group scales from the activation-weighted clipping search (clip.py) instead of
  each group's full range.

Full-precision targets (fp_target; GPTAQ, Li et al., 2025): in a sequential walk the
quantized path's inputs X_q differ from the source model's X_r for the same tokens. Plain GPTQ
makes the quantized layer reproduce W on X_q, so upstream errors pass through; with fp_target
it reproduces the source output X_r W^T instead, which compensates part of them. That is
GPTQ on a modified weight V, the least-squares answer pulled towards W (`fp_target_weight`).

Without act_order, a group's scale is taken when its first column is reached, from the weights
as updated so far (the usual GPTQ). Arithmetic is fp32; the quantize and dequantize steps are
primitives.py's, so the stored tensors dequantize to exactly the values the updates assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoutq.errors import ScoutqError
from scoutq.quant import primitives
from scoutq.quant.clip import search_qparams
from scoutq.quant.packed import PackedWeight
from scoutq.quant.scheme import Scheme


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    mse_scales: bool = False
    fp_target: bool = False  # the layer walk supplies X_q^T X_r and quantizes fp_target_weight
    fp_target_damp: float = 0.1


def fp_target_weight(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float,
                     what: str = "weight") -> torch.Tensor:
    """The weight V whose output on the quantized path's inputs best matches the source
    output on the full-precision inputs, pulled towards W:

        V = argmin ||X_q V^T - X_r W^T||^2 + lam ||V - W||^2,   lam = damp * mean(diag H)
          = (W C + lam W) (H + lam I)^-1,   H = X_q^T X_q,  C = X_r^T X_q = cross^T

    Args:
        w: source weight [out, in].
        hessian: X_q^T X_q [in, in].
        cross: X_q^T X_r [in, in], rows of X_q and X_r being the same tokens.
        damp: lam relative to H's mean diagonal; large keeps V near W (and equal as damp grows),
            and it bounds V where H is ill-conditioned (rare experts, inputs never seen).
    Returns V [out, in] fp32. With X_r = X_q, V = W.
    """
    h = hessian.float()
    lam = damp * float(h.diagonal().mean())
    if lam <= 0:
        return w.float().clone()  # no inputs at all: nothing to match
    system = h.clone()  # H + lam I, without materialising I (an [in, in] matrix is 268 MB at 8192)
    system.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(system)
    del system
    if int(info) != 0:
        raise ScoutqError(f"{what}: the calibration Hessian is not positive definite with fp_target_damp {damp}")
    wt = w.float().t()
    right = cross.float() @ wt + lam * wt  # [in, out]
    return torch.cholesky_solve(right, factor).t().contiguous()


def prepare_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H with never-seen inputs given a unit diagonal (their weights are then rounded alone,
    with nothing to compensate), plus the dampening term; fp32 copy."""
    h = hessian.float().clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal += damp * diagonal.mean()
    return h


def inverse_cholesky(h: torch.Tensor, what: str) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1), row-major.

    With J the order-reversing permutation and J H J = L L^T, U = J L^-1 J: upper triangular
    with a positive diagonal, and U^T U = J L^-T L^-1 J = H^-1. One factorisation and one
    triangular inverse, instead of inverting H and factorising the inverse (2.5x the work).
    Dampening is raised (up to 3 times, tenfold each) if H is not positive definite in fp32.
    """
    extra = 0.0
    size = h.shape[0]
    for _ in range(4):
        damped = h if extra == 0 else h + extra * h.diagonal().mean() * torch.eye(size)
        lower, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(lower, torch.eye(size), upper=False)
            # LAPACK results are column-major; the column loop reads rows of U, which must be contiguous.
            return inverse.flip(0, 1).contiguous()
        extra = 0.01 if extra == 0 else extra * 10
    raise ScoutqError(f"{what}: the calibration Hessian is not positive definite even with dampening 10")


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One input column of every row: (q int8 [out], dequantized fp32 [out]), as stored."""
    scaled = w / scale.float()
    if zero is not None:
        scaled = scaled + zero.float()
    q = torch.round(scaled).clamp_(scheme.qmin, scheme.qmax)
    shifted = q.to(scale.dtype) if zero is None else q.to(scale.dtype) - zero.to(scale.dtype)
    return q.to(torch.int8), (shifted * scale).float()


@dataclass(frozen=True)
class Factorized:
    """What GPTQ needs of a Hessian, computed once for every weight that reads the same input
    (gate and up of one expert share it)."""

    importance: torch.Tensor  # the dampened diagonal of H [in]
    order: torch.Tensor  # column processing order [in]
    upper: torch.Tensor  # upper Cholesky factor of H^-1, rows and columns in `order`


def factorize(hessian: torch.Tensor, options: GptqOptions, what: str = "weight") -> Factorized:
    h = prepare_hessian(hessian, options.damp)
    importance = h.diagonal().clone()
    if options.act_order:
        order = torch.argsort(importance, descending=True, stable=True)
        h = h[order][:, order]
    else:
        order = torch.arange(h.shape[0])
    torch.set_flush_denormal(True)
    try:
        return Factorized(importance, order, inverse_cholesky(h, what))
    finally:
        torch.set_flush_denormal(False)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | Factorized,
    scheme: Scheme,
    scale_dtype: torch.dtype | None = None,
    options: GptqOptions = GptqOptions(),
    what: str = "weight",
) -> PackedWeight:
    """Quantize an nn.Linear weight [out, in] given H = X^T X [in, in] of its inputs.

    Args:
        w: weight [out, in], any float dtype.
        hessian: X^T X summed over the calibration tokens (any positive scale; only ratios
            matter), or its `factorize` result with the same options.
        scheme: bits, group size, symmetry of the stored weight.
        scale_dtype: dtype of the stored scales (default: w's dtype).
        options: dampening, block size, activation order, scale search.
        what: names the tensor in errors.
    """
    # Error propagation drives many updates towards zero; subnormal floats take a slow path
    # on x86 (100x slower rank-one updates measured), so they are flushed to zero meanwhile.
    torch.set_flush_denormal(True)
    try:
        return _gptq(w, hessian, scheme, scale_dtype or w.dtype, options, what)
    finally:
        torch.set_flush_denormal(False)


def _gptq(w: torch.Tensor, hessian: torch.Tensor | Factorized, scheme: Scheme, scale_dtype: torch.dtype,
          options: GptqOptions, what: str) -> PackedWeight:
    out_features, in_features = w.shape
    group = scheme.group_size or in_features
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group}")
    factors = hessian if isinstance(hessian, Factorized) else factorize(hessian, options, what)
    importance, order, u = factors.importance, factors.order, factors.upper

    # Static scales (all groups fixed before any update): per-channel, or act_order.
    static = options.act_order or scheme.group_size is None
    scales = torch.empty(out_features, in_features // group, dtype=scale_dtype)
    zeros = None if scheme.symmetric else torch.empty(out_features, in_features // group, dtype=torch.int8)
    if static:
        if options.mse_scales:
            scales[:], found = search_qparams(w, importance, scheme, scale_dtype)
        else:
            scales[:], found = primitives.compute_qparams(w, scheme, scale_dtype)
        if zeros is not None:
            zeros[:] = found

    weights = w.float().t()[order].contiguous()  # [in, out]: one column of W is one contiguous row
    q_columns = torch.empty(in_features, out_features, dtype=torch.int8)
    # Without static scales, blocks hold whole groups, so a group's scale is taken inside one block.
    block = options.block_size if static else max(group, options.block_size // group * group)

    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        current = weights[start:end].clone()  # updated in place as columns are quantized
        errors = torch.empty_like(current)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not static and column % group == 0:
                values = current[i : i + group].t()  # [out, group], as updated so far
                if options.mse_scales:
                    scale, zero = search_qparams(values, importance[column : column + group],
                                                 Scheme(scheme.bits, None, scheme.symmetric), scale_dtype)
                else:
                    scale, zero = primitives.compute_qparams(values, Scheme(scheme.bits, None, scheme.symmetric),
                                                             scale_dtype)
                scales[:, g] = scale[:, 0]
                if zeros is not None and zero is not None:
                    zeros[:, g] = zero[:, 0]
            q, dq = _quantize_column(current[i], scales[:, g], None if zeros is None else zeros[:, g], scheme)
            q_columns[start + i] = q
            err = (current[i] - dq) / u_block[i, i]
            current[i + 1 :].addr_(u_block[i, i + 1 :], err, alpha=-1.0)
            errors[i] = err
        weights[end:].addmm_(u[start:end, end:].t(), errors, alpha=-1.0)

    if not bool(torch.isfinite(scales.float()).all()):
        raise ScoutqError(f"{what} contains NaN or Inf; refusing to quantize it")
    q = torch.empty_like(q_columns)
    q[order] = q_columns
    return PackedWeight.from_quantized(q.t().contiguous(), scales, zeros, scheme)
