"""What a job sees and decides at each step of the layer stream (walk.py).

The stream owns the order of the math; a client owns what happens to the weights. At every
group of modules that share one input the stream hands the client the source weights and the
input, and computes on with whatever weights the client returns:

    attention q, k, v   one input: the normed hidden states         -> StreamClient.linears
    attention o         o_proj's input, computed with q, k, v above  -> StreamClient.linears
    shared expert       gate, up and down of one SwiGLU               -> StreamClient.mlp
    dense MLP           (Maverick's interleaved layers)               -> StreamClient.mlp
    routed expert e     its routed tokens, and the context a coverage
                        policy needs (every token, the router logits) -> StreamClient.expert
    router              its choices (always full precision)           -> StreamClient.routing

The base class computes with the source weights and records nothing: evaluation overrides
`routing`, calibration overrides the weight hooks (statistics, then quantization). With
`paired`, a reference stream runs beside the main one through the source weights, and every
input comes with the same tokens' reference-stream input (GPTQ with full-precision targets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scoutq.model.moe import swiglu_intermediate

Weights = tuple[torch.Tensor, ...]  # nn.Linear weights [out, in], fp32
ProgressFn = Callable[[str, int, int], None]  # (what is being done, steps done, steps in this layer)


@dataclass
class ModuleInput:
    """The input rows [..., in] that a group of modules multiplies, in the main stream and (when
    paired) the same tokens in the reference stream."""

    x: torch.Tensor
    reference: torch.Tensor | None = None
    # The first layer whose router reads what this module writes into the residual stream
    # (o_proj: this layer; down_proj: the next); None for modules whose output stays inside.
    writes_residual_before: int | None = None
    _swiglu: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(x gate^T) * (x up^T), computed once for the same (gate, up) tensors: a client that
        needs the intermediate for down_proj's statistics and the stream that runs down_proj share it."""
        cached = self._swiglu
        if cached is None or cached[0] is not gate or cached[1] is not up:
            cached = self._swiglu = (gate, up, swiglu_intermediate(self.x, gate, up))
        return cached[2]


@dataclass
class ExpertInput(ModuleInput):
    """One routed expert's input: `x` holds the score-scaled rows of the tokens routed to it
    (what the expert multiplies), `tokens` their positions among the layer's N tokens.
    `layer_input` and `logits` (all N tokens, main stream) and their reference-stream twins
    let a client build statistics from tokens the router did not send here."""

    layer: int = 0
    expert: int = 0
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    layer_input: torch.Tensor | None = None  # [N, D] the MoE block's normed input
    logits: torch.Tensor | None = None  # [N, E] router logits
    reference_layer_input: torch.Tensor | None = None  # paired only
    reference_logits: torch.Tensor | None = None  # paired only

    def own_gate(self, logits: torch.Tensor) -> torch.Tensor:
        """This expert's gate value sigmoid(logit) for every row of `logits` [n, E] -> [n, 1]."""
        return torch.sigmoid(logits[:, self.expert].float())[:, None]


class StreamClient:
    """The hooks of the layer stream; the defaults compute with the source weights."""

    paired: bool = False  # run a reference stream through the source weights beside the main one

    def linears(self, names: tuple[str, ...], weights: Weights, inputs: ModuleInput) -> Weights:
        """Weights to compute with for modules `names` that all multiply `inputs`."""
        return weights

    def mlp(self, names: tuple[str, str, str], weights: Weights, inputs: ModuleInput) -> Weights:
        """(gate, up, down) of a SwiGLU block on `inputs`; down multiplies inputs.swiglu(gate, up)."""
        return weights

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        """(gate, up, down) of one routed expert; called for every expert, routed tokens or not."""
        return weights

    def before_experts(self, layer: int, expert_input: Callable[[int], ExpertInput]) -> None:
        """Called once per MoE layer before the first routed expert, with a function that builds
        any expert's input: a client may do work for several experts at once here (processes
        that share a layer's experts quantize their own ones ahead, then exchange them)."""

    def routing(self, layer: int, experts: torch.Tensor) -> None:
        """The experts [N, k] the main stream's router chose for each token of MoE layer `layer`."""

    def progress(self, what: str, done: int, total: int) -> None:
        """Steps inside the current layer (attention, each expert), for a progress bar."""
