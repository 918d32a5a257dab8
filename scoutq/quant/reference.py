"""Slow, obvious twins of primitives.py: one value, one bit field at a time.

Used only by tests, which require the fast primitives to match these bit for bit. Written
from the format's definition (quantized-formats.md B1), not from the fast code.
"""

from __future__ import annotations

import math

import torch

from scoutq.quant.scheme import Scheme


def qparams(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, signed: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    out_features, in_features = w.shape
    size = scheme.group_size or in_features
    groups = in_features // size
    levels = scheme.qmax - scheme.qmin
    scale = torch.empty(out_features, groups, dtype=scale_dtype)
    zero = None if scheme.symmetric else torch.empty(out_features, groups, dtype=torch.int8)
    tiny = torch.finfo(scale_dtype).tiny
    for row in range(out_features):
        for g in range(groups):
            values = w[row, g * size : (g + 1) * size].float()
            if scheme.symmetric and signed:
                # The value of largest magnitude goes to qmin; between -a and +a, -a (scale > 0).
                extreme = max(values.tolist(), key=lambda v: (abs(v), v < 0))
                s = max(abs(extreme) / -scheme.qmin, tiny)
                scale[row, g] = torch.tensor(s if extreme <= 0 else -s).to(scale_dtype)
            elif scheme.symmetric:
                s = float(values.abs().max()) / (levels / 2)
                scale[row, g] = torch.tensor(max(s, tiny)).to(scale_dtype)
            else:
                low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
                # fp32 arithmetic throughout, as for quantize: in float64, (high - low) and
                # low / s round differently for fp32 weights and move the last bit of the scale.
                low32, high32 = torch.tensor(low, dtype=torch.float32), torch.tensor(high, dtype=torch.float32)
                s = torch.tensor(max(float((high32 - low32) / levels), tiny), dtype=torch.float32).to(scale_dtype)
                scale[row, g] = s
                z = round(float(torch.tensor(float(scheme.qmin)) - low32 / s.float()))  # half to even, as torch.round
                zero[row, g] = min(max(z, scheme.qmin), scheme.qmax)  # type: ignore[index]
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    out_features, in_features = w.shape
    size = scheme.group_size or in_features
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    for row in range(out_features):
        for col in range(in_features):
            g = col // size
            # fp32 arithmetic, as the definition says: round(w / s) + z
            x = torch.tensor(float(w[row, col]), dtype=torch.float32) / scale[row, g].float()
            if zero is not None:
                x = x + float(zero[row, g])
            q[row, col] = int(min(max(torch.round(x).item(), scheme.qmin), scheme.qmax))
    return q


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = q.shape
    per_word = 32 // bits
    words = math.ceil(cols / per_word)
    packed = torch.zeros(rows, words, dtype=torch.int32)
    for row in range(rows):
        for word in range(words):
            value = 0
            for j in range(per_word):
                col = word * per_word + j
                if col < cols:
                    unsigned = int(q[row, col]) + (1 << (bits - 1))
                    value |= unsigned << (bits * j)  # element j at bits [bits*j, bits*(j+1))
            if value >= 1 << 31:  # store the 32-bit pattern as a signed int32
                value -= 1 << 32
            packed[row, word] = value
    return packed


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = packed.shape[0]
    per_word = 32 // bits
    q = torch.empty(rows, cols, dtype=torch.int8)
    for row in range(rows):
        for col in range(cols):
            word = int(packed[row, col // per_word]) & 0xFFFFFFFF
            unsigned = (word >> (bits * (col % per_word))) & ((1 << bits) - 1)
            q[row, col] = unsigned - (1 << (bits - 1))
    return q


def gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, damp: float,
         signed: bool = False) -> torch.Tensor:
    """GPTQ as optimal brain quantization states it, in float64, one column at a time: round
    column j, spread its error over the later columns with the inverse Hessian, then remove j
    from the inverse (a Schur complement) instead of using a Cholesky factor or blocks.
    Group scales are taken from the weights as updated when the group's first column is
    reached. Returns q int8 [out, in]; scales come from `qparams` on the same values."""
    out_features, in_features = w.shape
    size = scheme.group_size or in_features
    h = hessian.double().clone()
    for j in range(in_features):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h += damp * float(h.diagonal().mean()) * torch.eye(in_features, dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    weights = w.double().clone()
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    scale = zero = None
    for j in range(in_features):
        if j % size == 0:
            group_scheme = Scheme(scheme.bits, None, scheme.symmetric)
            scale, zero = qparams(weights[:, j : j + size].float(), group_scheme, scale_dtype, signed)
        assert scale is not None
        column = quantize(weights[:, j : j + 1].float(), scale, zero, Scheme(scheme.bits, None, scheme.symmetric))
        q[:, j] = column[:, 0]
        shifted = column[:, 0].to(scale_dtype) - (0 if zero is None else zero[:, 0].to(scale_dtype))
        dequantized = (shifted * scale[:, 0]).double()
        error = (weights[:, j] - dequantized) / inverse[j, j]
        weights[:, j:] -= error[:, None] * inverse[j, j:][None, :]
        inverse -= inverse[:, j : j + 1] @ inverse[j : j + 1, :] / inverse[j, j]
    return q


def gptq_output_metric(w: torch.Tensor, hessian: torch.Tensor, metric: torch.Tensor, scheme: Scheme,
                       scale_dtype: torch.dtype, damp: float) -> torch.Tensor:
    """GPTQ with an output metric M, stated directly: the objective vec(E)^T (M kron H) vec(E)
    over every weight at once (E = W - Q, rows in order), solved by the same float64 Schur
    complement step as `gptq`, one weight at a time, row by row. A group's scale is taken from
    its row's values as updated when its first column is reached. Returns q int8 [out, in]."""
    out_features, in_features = w.shape
    size = scheme.group_size or in_features
    one = Scheme(scheme.bits, None, scheme.symmetric)
    h = hessian.double().clone()
    for j in range(in_features):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h += damp * float(h.diagonal().mean()) * torch.eye(in_features, dtype=torch.float64)
    inverse = torch.linalg.inv(torch.kron(metric.double(), h))
    weights = w.double().reshape(-1).clone()
    q = torch.empty(out_features * in_features, dtype=torch.int8)
    scale = zero = None
    for v in range(out_features * in_features):
        j = v % in_features
        if j % size == 0:
            scale, zero = qparams(weights[v : v + size].float()[None, :], one, scale_dtype)
        assert scale is not None
        value = quantize(weights[v : v + 1].float()[None, :], scale, zero, one)[0, 0]
        q[v] = value
        shifted = value.to(scale_dtype) - (0 if zero is None else zero[0, 0].to(scale_dtype))
        dequantized = float(shifted * scale[0, 0])
        error = (weights[v] - dequantized) / inverse[v, v]
        weights[v:] -= error * inverse[v, v:]
        inverse -= inverse[:, v : v + 1] @ inverse[v : v + 1, :] / inverse[v, v]
    return q.view(out_features, in_features)


def fp_target_weight(w: torch.Tensor, x: torch.Tensor, x_reference: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTAQ's target weight stated as the regression it is, from the inputs themselves: the V
    that best maps the quantized path's inputs x [N, in] to the source output x_reference W^T,
    with damp * mean(diag x^T x) * ||V - W||^2 added, solved as one float64 least-squares
    problem on the stacked system [x; sqrt(lam) I] V^T = [x_reference W^T; sqrt(lam) W^T]."""
    x64, w64 = x.double(), w.double()
    lam = damp * float((x64 * x64).sum(0).mean())
    root = lam**0.5 * torch.eye(x.shape[1], dtype=torch.float64)
    system = torch.cat([x64, root])
    target = torch.cat([x_reference.double() @ w64.t(), root @ w64.t()])
    return torch.linalg.lstsq(system, target).solution.t().float()


def clip_qparams(w: torch.Tensor, importance: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype,
                 ratios: list[float], signed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activation-weighted clipping, one row and group at a time: for each ratio, qparams of the
    shrunk values (shrinking each value shrinks the range by the same ratio), error summed in
    float64; the first ratio with the smallest error wins."""
    out_features, in_features = w.shape
    size = scheme.group_size or in_features
    groups = in_features // size
    one = Scheme(scheme.bits, None, scheme.symmetric)
    scale = torch.empty(out_features, groups, dtype=scale_dtype)
    zero = None if scheme.symmetric else torch.empty(out_features, groups, dtype=torch.int8)
    for row in range(out_features):
        for g in range(groups):
            values = w[row : row + 1, g * size : (g + 1) * size].float()
            weight = importance[g * size : (g + 1) * size].double()
            best = None
            for ratio in ratios:
                s, z = qparams(values * ratio, one, scale_dtype, signed)
                q = quantize(values, s, z, one)
                shifted = q.to(scale_dtype) - (0 if z is None else z.to(scale_dtype))
                error = float(((values.double() - (shifted * s).double()) ** 2 * weight).sum())
                if best is None or error < best[0]:
                    best = (error, s, z)
            assert best is not None
            scale[row, g] = best[1][0, 0]
            if zero is not None and best[2] is not None:
                zero[row, g] = best[2][0, 0]
    return scale, zero
