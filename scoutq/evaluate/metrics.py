"""Fidelity metrics of a candidate model against a reference: pure functions on tensors.

The statistics are llama.cpp's `--kl-divergence` set (field-notes C.14, D.3): perplexity,
KL(P_ref || P_cand) per token, same-top-token agreement, plus MoE routing agreement (D.2).
Log-probabilities are taken in fp64: quantization moves a bf16 model's log-probabilities by
~1e-3, so rounding in the softmax itself must stay well below that. The fp64 work is done in
row chunks, so a [N, 202048] vocabulary never needs an [N, V] fp64 temporary at once.

Confidence intervals use a normal approximation over independent units. Tokens of one window
share their context and are strongly correlated, so a window (not a token) is the unit
wherever the caller can say which tokens belong together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
_CHUNK_ELEMENTS = 1 << 24  # fp64 rows per chunk: at most 128 MiB per temporary


class Perplexity(NamedTuple):
    """exp(mean NLL) and its 95% interval (NaN bounds when the spread is unknown)."""

    value: float
    low: float
    high: float


def _row_chunks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _check_pair(reference: torch.Tensor, candidate: torch.Tensor) -> None:
    if reference.dim() != 2 or reference.shape != candidate.shape:
        raise ValueError(f"expected two [N, V] logits of one shape, got {tuple(reference.shape)} and "
                         f"{tuple(candidate.shape)}")


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood -log p(target) of each token, fp64.

    Args:
        logits: [N, V] next-token logits, any float dtype.
        targets: [N] int64 token ids.

    Returns:
        [N] fp64 NLL (natural log), on the logits' device.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    nll = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for rows in _row_chunks(*logits.shape):
        log_p = logits[rows].double().log_softmax(dim=-1)
        nll[rows] = -log_p.gather(1, targets[rows, None].to(log_p.device)).squeeze(1)
    return nll


def kl_divergence(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_cand) = sum_v p_ref * (log p_ref - log p_cand) per token, fp64 [N].

    The direction llama.cpp reports: expectations under the reference, so a candidate is
    penalised most where the reference is confident. Vocabulary entries with p_ref = 0 add
    nothing (0 * log 0 = 0). Exact math is >= 0; rounding can give -1e-17, so clamp at 0.
    """
    _check_pair(reference_logits, candidate_logits)
    kl = torch.empty(reference_logits.shape[0], dtype=torch.float64, device=reference_logits.device)
    for rows in _row_chunks(*reference_logits.shape):
        log_p = reference_logits[rows].double().log_softmax(dim=-1)
        log_q = candidate_logits[rows].to(log_p.device).double().log_softmax(dim=-1)
        p = log_p.exp()
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
        kl[rows] = terms.sum(dim=-1).clamp_min(0.0)
    return kl


def top1_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """bool [N]: does the candidate's most likely next token equal the reference's?"""
    _check_pair(reference_logits, candidate_logits)
    return reference_logits.argmax(dim=-1) == candidate_logits.to(reference_logits.device).argmax(dim=-1)


def mean_interval(values: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(mean, low, high): a weighted mean of independent units and its 95% normal interval.

    With unit weights w_i (normalised to sum 1) the mean is m = sum w_i x_i and its variance is
    estimated by the linearisation W/(W-1) * sum w_i^2 (x_i - m)^2 (the ratio estimator's
    variance; with equal weights exactly s^2 / W). Fewer than 2 units: bounds are NaN.
    """
    x = values.detach().double().flatten().cpu()
    if x.numel() == 0:
        raise ValueError("cannot average zero values")
    w = torch.ones_like(x) if weights is None else weights.detach().double().flatten().cpu()
    if w.shape != x.shape or bool((w <= 0).any()):
        raise ValueError(f"expected {x.numel()} positive weights, got {tuple(w.shape)}")
    w = w / w.sum()
    mean = float((w * x).sum())
    units = x.numel()
    if units < 2:
        return mean, math.nan, math.nan
    half = Z95 * math.sqrt(units / (units - 1) * float((w.square() * (x - mean).square()).sum()))
    return mean, mean - half, mean + half


def perplexity_with_interval(
    nll_per_window: Sequence[float] | torch.Tensor, tokens_per_window: int | Sequence[int] | torch.Tensor
) -> Perplexity:
    """Perplexity exp(mean NLL over all scored tokens) with a 95% confidence interval.

    Method: the mean NLL over all tokens is the token-weighted mean of the windows' mean NLLs.
    Windows are the independent units (tokens within a window share context, so a per-token
    standard error would be far too narrow); the interval of that weighted mean comes from the
    spread of the window means (`mean_interval`, normal approximation). It is built on the NLL
    scale and exponentiated, exp(m +- 1.96 se), so it is asymmetric around the perplexity.

    Args:
        nll_per_window: [W] mean NLL (nats per token) of each window.
        tokens_per_window: tokens scored in each window: one int for all, or [W].

    Returns:
        Perplexity(value, low, high); low and high are NaN for a single window.
    """
    means = torch.as_tensor(nll_per_window, dtype=torch.float64).flatten()
    counts = torch.as_tensor(tokens_per_window, dtype=torch.float64).flatten()
    if counts.numel() == 1:
        counts = counts.expand_as(means)
    mean, low, high = mean_interval(means, counts)
    return Perplexity(math.exp(mean), math.exp(low), math.exp(high))


def _quantile(ordered: torch.Tensor, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) on an ascending tensor."""
    position = q * (ordered.numel() - 1)
    below = math.floor(position)
    above = min(below + 1, ordered.numel() - 1)
    fraction = position - below
    return float(ordered[below] * (1 - fraction) + ordered[above] * fraction)


def summarize_kl(kl: torch.Tensor, window: int | None = None, window_means: torch.Tensor | None = None,
                 window_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Mean (with its 95% interval), median, 99th percentile and max of per-token KL.

    Args:
        kl: [N] per-token KL divergences.
        window: tokens per window when kl is window after window ([W * window]): the interval
            then treats windows as the independent units (see perplexity_with_interval).
            None treats every token as independent, as llama.cpp does (a narrower interval).
        window_means, window_tokens: [W] each window's mean KL and its token count, for windows
            of different lengths: the interval is then the token-weighted one over windows.

    Returns:
        {"mean", "mean_low", "mean_high", "median", "p99", "max"}, floats.
    """
    values = kl.detach().double().flatten().cpu()
    if values.numel() == 0:
        raise ValueError("cannot summarize zero KL values")
    if window_means is not None and window_tokens is not None:
        mean, low, high = mean_interval(window_means, window_tokens)
    elif window is not None:
        if window < 1 or values.numel() % window:
            raise ValueError(f"{values.numel()} KL values do not split into windows of {window}")
        mean, low, high = mean_interval(values.view(-1, window).mean(dim=1))
    else:
        mean, low, high = mean_interval(values)
    ordered = values.sort().values
    return {"mean": mean, "mean_low": low, "mean_high": high, "median": _quantile(ordered, 0.5),
            "p99": _quantile(ordered, 0.99), "max": float(ordered[-1])}


def routing_agreement(reference_experts: torch.Tensor, candidate_experts: torch.Tensor) -> float:
    """Share of tokens whose selected expert set is unchanged (top-1: the same expert).

    Order within a token's top-k does not matter: the MoE output sums over the set (the gate
    values differ, but that is what KL measures). Args: [N, k] int expert indices each.
    """
    if reference_experts.dim() != 2 or reference_experts.shape != candidate_experts.shape:
        raise ValueError(f"expected two [N, k] expert tensors of one shape, got {tuple(reference_experts.shape)} "
                         f"and {tuple(candidate_experts.shape)}")
    if reference_experts.shape[0] == 0:
        raise ValueError("cannot compare routing of zero tokens")
    return float(same_expert_sets(reference_experts, candidate_experts).double().mean())


def same_expert_sets(reference_experts: torch.Tensor, candidate_experts: torch.Tensor) -> torch.Tensor:
    """bool [N]: per token, equal expert sets (compared after sorting each row)."""
    ref = reference_experts.sort(dim=-1).values
    cand = candidate_experts.to(ref.device).sort(dim=-1).values
    return (ref == cand).all(dim=-1)
