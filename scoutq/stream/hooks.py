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

from scoutq.model.moe import ExpertGroups, route, swiglu_intermediate

Weights = tuple[torch.Tensor, ...]  # nn.Linear weights [out, in], fp32
ProgressFn = Callable[[str, int, int], None]  # (what is being done, steps done, steps in this layer)


@dataclass(frozen=True)
class Windows:
    """How rows [N, F] divide into the token windows they came from: window i holds `rows[i]`.

    Every computation that a window's hidden states depend on (a matmul, a norm, a sigmoid) runs
    one window at a time: a float result then depends only on the window's own values, not on
    how many other rows were computed beside it (kernels pick their blocking and vector paths by
    size). That is what lets processes that carry different windows reproduce one process's
    bytes (stream/processes.py). Exact elementwise arithmetic (+, -, *) may span windows.
    """

    rows: tuple[int, ...]

    @classmethod
    def uniform(cls, count: int, length: int) -> Windows:
        return cls((length,) * count)

    @classmethod
    def joined(cls, parts: list[Windows]) -> Windows:
        return cls(tuple(count for part in parts for count in part.rows))

    @property
    def total(self) -> int:
        return sum(self.rows)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(list(self.rows))

    def map(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """fn applied to each window's rows of every x (aligned), concatenated in window order."""
        if not self.rows:
            return fn(*xs)
        return torch.cat([fn(*parts) for parts in zip(*(self.split(x) for x in xs), strict=True)])

    def select(self, positions: torch.Tensor) -> Windows:
        """The windows of rows `positions` (ascending) taken from these rows."""
        ends = torch.tensor(self.rows, device=positions.device).cumsum(0)
        window = torch.searchsorted(ends, positions, right=True)
        return Windows(tuple(torch.bincount(window, minlength=len(self.rows)).tolist()))


@dataclass
class ModuleInput:
    """The input rows [N, in] that a group of modules multiplies, in the main stream and (when
    paired) the same tokens in the reference stream, with the windows the rows belong to."""

    x: torch.Tensor
    reference: torch.Tensor | None = None
    # The first layer whose router reads what this module writes into the residual stream
    # (o_proj: this layer; down_proj: the next); None for modules whose output stays inside.
    writes_residual_before: int | None = None
    windows: Windows = field(kw_only=True)
    _swiglu: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(x gate^T) * (x up^T) window by window, computed once for the same (gate, up): a
        client that needs the intermediate for down_proj's statistics and the stream that runs
        down_proj share it."""
        cached = self._swiglu
        if cached is None or cached[0] is not gate or cached[1] is not up:
            intermediate = self.windows.map(lambda rows: swiglu_intermediate(rows, gate, up), self.x)
            cached = self._swiglu = (gate, up, intermediate)
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


@dataclass
class MoeInputs:
    """A MoE layer's normed input [N, D] and router logits in both streams, routed window by
    window: every routed expert's input is cut from here (a client of several processes builds
    the same from every process's windows)."""

    layer: int
    x: torch.Tensor
    windows: Windows
    logits: torch.Tensor
    groups: ExpertGroups
    chosen: torch.Tensor  # [N, k] the experts the main stream's router chose
    reference: torch.Tensor | None = None
    reference_logits: torch.Tensor | None = None
    reference_groups: ExpertGroups | None = None

    @classmethod
    def route(cls, layer: int, x: torch.Tensor, windows: Windows, logits: torch.Tensor, top_k: int,
              reference: torch.Tensor | None = None, reference_logits: torch.Tensor | None = None) -> MoeInputs:
        experts = logits.shape[-1]
        scores, chosen = _route_windows(logits, windows, top_k)
        groups_r = None
        if reference is not None and reference_logits is not None:  # the reference routes by its own logits
            groups_r = ExpertGroups.of(*_route_windows(reference_logits, windows, top_k), experts)
        return cls(layer, x, windows, logits, ExpertGroups.of(scores, chosen, experts), chosen,
                   reference, reference_logits, groups_r)

    def expert(self, expert: int) -> ExpertInput:
        """Expert `expert`'s input in the main stream, with the layer's context."""
        tokens, scores = self.groups.expert(expert)
        return ExpertInput(self.x[tokens] * scores[:, None], None, self.layer + 1, windows=self.windows.select(tokens),
                           layer=self.layer, expert=expert, tokens=tokens, layer_input=self.x, logits=self.logits,
                           reference_layer_input=self.reference, reference_logits=self.reference_logits)

    def reference_routed(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, Windows]:
        """The tokens the reference router sent to `expert`, their score-scaled reference rows,
        and the rows' windows."""
        assert self.reference_groups is not None and self.reference is not None
        tokens, scores = self.reference_groups.expert(expert)
        return tokens, self.reference[tokens] * scores[:, None], self.windows.select(tokens)


def _route_windows(logits: torch.Tensor, windows: Windows, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.route window by window (its sigmoid is a vectorised kernel whose path depends on size)."""
    parts = [route(part, top_k) for part in windows.split(logits)] or [route(logits, top_k)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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

    def before_experts(self, moe: MoeInputs) -> None:
        """Called once per MoE layer before the first routed expert, with what every expert's
        input is cut from: a client may do work for several experts at once here (processes
        that share a layer's experts quantize their own ones ahead, then exchange them)."""

    def routing(self, layer: int, experts: torch.Tensor) -> None:
        """The experts [N, k] the main stream's router chose for each token of MoE layer `layer`."""

    def progress(self, what: str, done: int, total: int) -> None:
        """Steps inside the current layer (attention, each expert), for a progress bar."""
