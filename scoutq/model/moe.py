"""Mixture-of-experts block of Llama 4: router, grouped routed experts, shared expert.

    scores, experts = top-k of router(x), sigmoid of the kept logits (no renormalisation)
    y = SharedExpert(x) + sum over each token's k experts of Expert_e(score * x)

The score multiplies the expert's *input*, not its output (llama4-format.md §2): since SwiGLU
is nonlinear, Expert(g * x) != g * Expert(x). Unlike transformers, which runs every token
through every expert with zero-scaled rows, tokens are grouped by expert and each expert
computes only its own tokens: a sort and one matmul per active expert, no loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scoutq.checkpoint.config import TextConfig

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def swiglu_intermediate(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(x gate^T) * (x up^T): a SwiGLU's intermediate from nn.Linear weights [out, in]
    (the calibration walk and the error report compute with bare weights, not modules)."""
    return F.silu(x @ gate.t()) * (x @ up.t())


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). The shared expert and dense layers."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts of a layer, stacked as nn.Linear weights [E, out, in].

    The checkpoint stores them as [E, in, out] (`gate_up_proj`, `down_proj`); the loader
    transposes once, because [out, in] is the layout fast CPU and GPU matmuls want.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))  # gate rows, then up rows
        self.down = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[expert])


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their gate values sigmoid(logit), computed in fp32.

    logits [N, E] -> (scores [N, k] in the logits' dtype, experts [N, k] int64).
    """
    top_logits, experts = torch.topk(logits, top_k, dim=-1)
    scores = torch.sigmoid(top_logits.float()).to(logits.dtype)
    return scores, experts


@dataclass(frozen=True)
class ExpertGroups:
    """A layer's (token, slot) pairs sorted by expert: the one grouping both the resident
    runtime and the layer stream use, so every path computes each expert on the same rows."""

    tokens: torch.Tensor  # [N * k] token index of each pair, grouped by expert
    scores: torch.Tensor  # [N * k] the pair's gate value, in the same order
    bounds: list[int]  # pairs of expert e are [bounds[e], bounds[e + 1])

    @classmethod
    def of(cls, scores: torch.Tensor, experts: torch.Tensor, num_experts: int) -> ExpertGroups:
        """From route()'s scores and experts [N, k]."""
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = torch.arange(experts.shape[0], device=experts.device).repeat_interleave(experts.shape[1])[order]
        counts = torch.bincount(flat, minlength=num_experts)
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        return cls(tokens, scores.reshape(-1)[order], bounds)

    def expert(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens routed to `expert` [n] and their gate values [n]."""
        start, stop = self.bounds[expert], self.bounds[expert + 1]
        return self.tokens[start:stop], self.scores[start:stop]


def dispatch(
    x: torch.Tensor,  # [N, D]
    scores: torch.Tensor,  # [N, k]
    experts: torch.Tensor,  # [N, k]
    num_experts: int,
    expert_fn: ExpertFn,
) -> torch.Tensor:
    """Sum over each token's experts of expert_fn(e, score * x), computing grouped by expert."""
    groups = ExpertGroups.of(scores, experts, num_experts)
    inputs = x[groups.tokens] * groups.scores[:, None]  # score-scaled, grouped by expert
    outputs = torch.empty_like(inputs)
    for expert in range(num_experts):
        start, stop = groups.bounds[expert], groups.bounds[expert + 1]
        if stop > start:
            outputs[start:stop] = expert_fn(expert, inputs[start:stop])
    return torch.zeros_like(x).index_add_(0, groups.tokens, outputs)


class MoE(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, D]
        scores, experts = route(self.router(x), self.top_k)
        grouped = getattr(self.experts, "grouped", None)  # all experts in one kernel launch (GPU backend)
        if grouped is not None:
            routed = grouped(x, scores, experts)
        else:
            routed = dispatch(x, scores, experts, self.num_experts, self.experts.forward_expert)
        return self.shared_expert(x) + routed
