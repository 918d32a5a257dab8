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
* signed_scales: symmetric scales signed so that each group's largest-magnitude value lands
  on qmin (primitives.signed_scale): a step of absmax / 8 instead of / 7.5 at int4.
* router_weight, row_blocks: router-aware rounding, below.

Full-precision targets (fp_target; GPTAQ, Li et al., 2025): in a sequential walk the
quantized path's inputs X_q differ from the source model's X_r for the same tokens. Plain GPTQ
makes the quantized layer reproduce W on X_q, so upstream errors pass through; with fp_target
it reproduces the source output X_r W^T instead, which compensates part of them. That is
GPTQ on a modified weight V, the least-squares answer pulled towards W (`fp_target_weight`).

Router-aware rounding (router_weight; scoutq's addition): in a top-1 MoE much of the output
divergence comes from tokens whose expert choice flips, and the routers read the residual
stream that every down_proj writes into. Plain GPTQ treats the output rows of W alike; with an
output metric M [out, out] the objective becomes tr(M (W - Q) H (W - Q)^T), which weighs errors
along later routers' directions more (`router_metric`). Rows are then coupled: the exact
sequential solution (Babai's nearest plane on M kron H) quantizes rows one by one and, once row
r is done, moves every later row r' by -coupling[r, r'] times row r's total rounding error, with
coupling from M's inverse Cholesky factor (`output_coupling`); within a row it is plain GPTQ.
Rows are processed in `row_blocks` blocks, each one GPTQ sweep (static scales are taken per
block, from its rows as the earlier blocks left them), which drops the coupling inside
a block (1/row_blocks of the pairs) but keeps the Python loop at row_blocks sweeps per weight.

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
from scoutq.quant.settings import ClipSettings, GptqSettings


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


def router_metric(directions: torch.Tensor, weight: float) -> torch.Tensor:
    """The output metric M = I + weight * P [D, D] for a weight writing into the residual stream.

    `directions` [K, D] are the later routers' rows, each router centred over its experts (top-1
    choice depends only on logit differences) and scaled by its RMSNorm weight. P = A^T A / the
    largest eigenvalue of A^T A, so `weight` is how much more an error along the most
    router-sensitive direction costs than an error orthogonal to all of them. This ignores the
    layers in between (attention, MLPs): the residual path carries the error to every later
    router directly, and that first-order term is what the metric weights."""
    size = directions.shape[1]
    metric = torch.eye(size)
    if weight <= 0 or directions.numel() == 0:
        return metric
    a = directions.float()
    largest = float(torch.linalg.eigvalsh(a @ a.t()).max())  # A A^T: K x K, same spectrum
    if largest <= 0:
        return metric
    metric.addmm_(a.t(), a, alpha=weight / largest)
    return metric


def output_coupling(metric: torch.Tensor) -> torch.Tensor:
    """U / diag(U) row-wise, with U the upper Cholesky factor of M^-1: entry [r, r'] (r' > r) is
    the share of row r's rounding error that row r' absorbs under the metric M."""
    upper = inverse_cholesky(metric.float(), "output metric")
    return upper / upper.diagonal()[:, None]


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


def factorize(hessian: torch.Tensor, options: GptqSettings, what: str = "weight") -> Factorized:
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
    options: GptqSettings = GptqSettings(),
    what: str = "weight",
    coupling: torch.Tensor | None = None,
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
        coupling: `output_coupling(M)` for an output metric M [out, out]: minimise
            tr(M (W - Q) H (W - Q)^T) instead, rows taken in `options.row_blocks` blocks.
    """
    # Error propagation drives many updates towards zero; subnormal floats take a slow path
    # on x86 (100x slower rank-one updates measured), so they are flushed to zero meanwhile.
    torch.set_flush_denormal(True)
    try:
        return _gptq(w, hessian, scheme, scale_dtype or w.dtype, options, what, coupling)
    finally:
        torch.set_flush_denormal(False)


def _gptq(w: torch.Tensor, hessian: torch.Tensor | Factorized, scheme: Scheme, scale_dtype: torch.dtype,
          options: GptqSettings, what: str, coupling: torch.Tensor | None) -> PackedWeight:
    out_features, in_features = w.shape
    group = scheme.group_size or in_features
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group}")
    if coupling is not None and coupling.shape != (out_features, out_features):
        raise ValueError(f"{what}: output coupling {tuple(coupling.shape)} does not match {out_features} rows")
    factors = hessian if isinstance(hessian, Factorized) else factorize(hessian, options, what)

    # Static scales (all groups fixed before any update): per-channel, or act_order.
    static = options.act_order or scheme.group_size is None
    scales = torch.empty(out_features, in_features // group, dtype=scale_dtype)
    zeros = None if scheme.symmetric else torch.empty(out_features, in_features // group, dtype=torch.int8)
    weights = w.float().t()[factors.order].contiguous()  # [in, out]: one column of W is one contiguous row
    q_columns = torch.empty(in_features, out_features, dtype=torch.int8)

    row_blocks = 1 if coupling is None else min(options.row_blocks, out_features)
    rows_per_block = -(-out_features // row_blocks)
    for first in range(0, out_features, rows_per_block):
        rows = slice(first, min(first + rows_per_block, out_features))
        later = slice(rows.stop, out_features)
        # The rows' weights as the earlier row blocks' errors left them (all of W when uncoupled).
        block = weights if row_blocks == 1 else weights[:, rows].contiguous()
        if static:
            current = w
            if row_blocks > 1:
                current = torch.empty(rows.stop - rows.start, in_features)
                current[:, factors.order] = block.t()
            found_scales, found_zeros = _static_qparams(current, factors.importance, scheme, scale_dtype, options)
            scales[rows] = found_scales
            if zeros is not None:
                zeros[rows] = found_zeros
        feeds_later = coupling is not None and later.start < later.stop
        start_values = block.clone() if feeds_later else None
        dequantized = torch.empty_like(block) if feeds_later else None
        _sweep(block, factors, scheme, scale_dtype, options, static, scales[rows],
               None if zeros is None else zeros[rows], q_columns[:, rows], dequantized)
        if start_values is not None and dequantized is not None and coupling is not None:
            # Row r's whole rounding error (its start values minus what it became) reaches each
            # later row r' scaled by coupling[r, r']: the nearest-plane step of the metric M.
            weights[:, later].addmm_(start_values - dequantized, coupling[rows, later], alpha=-1.0)

    if not bool(torch.isfinite(scales.float()).all()):
        raise ScoutqError(f"{what} contains NaN or Inf; refusing to quantize it")
    q = torch.empty_like(q_columns)
    q[factors.order] = q_columns
    return PackedWeight.from_quantized(q.t().contiguous(), scales, zeros, scheme)


def _static_qparams(w: torch.Tensor, importance: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype,
                    options: GptqSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    if options.mse_scales:
        return search_qparams(w, importance, scheme, scale_dtype, ClipSettings(signed_scales=options.signed_scales))
    return primitives.compute_qparams(w, scheme, scale_dtype, options.signed_scales)


def _sweep(weights: torch.Tensor, factors: Factorized, scheme: Scheme, scale_dtype: torch.dtype,
           options: GptqSettings, static: bool, scales: torch.Tensor, zeros: torch.Tensor | None,
           q_columns: torch.Tensor, dequantized: torch.Tensor | None) -> None:
    """The column loop over one set of rows. weights [in, rows] in processing order, updated in
    place; fills q_columns [in, rows] (and dequantized, if given), and the scales (and zeros) of
    each group as it is reached when they are not static."""
    importance, order, u = factors.importance, factors.order, factors.upper
    in_features = weights.shape[0]
    group = scheme.group_size or in_features
    # Without static scales, blocks hold whole groups, so a group's scale is taken inside one block.
    block = options.block_size if static else max(group, options.block_size // group * group)
    one_group = Scheme(scheme.bits, None, scheme.symmetric)
    scale_search = ClipSettings(signed_scales=options.signed_scales)

    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        current = weights[start:end].clone()  # updated in place as columns are quantized
        errors = torch.empty_like(current)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not static and column % group == 0:
                values = current[i : i + group].t()  # [rows, group], as updated so far
                if options.mse_scales:
                    scale, zero = search_qparams(values, importance[column : column + group], one_group, scale_dtype,
                                                 scale_search)
                else:
                    scale, zero = primitives.compute_qparams(values, one_group, scale_dtype, options.signed_scales)
                scales[:, g] = scale[:, 0]
                if zeros is not None and zero is not None:
                    zeros[:, g] = zero[:, 0]
            q, dq = _quantize_column(current[i], scales[:, g], None if zeros is None else zeros[:, g], scheme)
            q_columns[start + i] = q
            if dequantized is not None:
                dequantized[start + i] = dq
            err = (current[i] - dq) / u_block[i, i]
            current[i + 1 :].addr_(u_block[i, i + 1 :], err, alpha=-1.0)
            errors[i] = err
        weights[end:].addmm_(u[start:end, end:].t(), errors, alpha=-1.0)
