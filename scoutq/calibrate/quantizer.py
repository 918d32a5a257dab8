"""The calibration client of the layer stream: every module is quantized from what it really sees.

The stream (scoutq/stream/walk.py) shows this client each group of modules with its input
before the group runs; the client gathers the input's statistics, quantizes the modules the
plan names, and hands back the dequantized weights, which the stream then computes with. So
every later module is calibrated on the errors of the modules before it (sequential
quantization), and the router, which the stream never offers, stays in full precision.

    q, k, v        X^T X of the normed input, one factorisation shared by the three
    o              X^T X of o_proj's input (computed with the quantized q, k, v)
    gate, up       X^T X of the SwiGLU's input; down: of the intermediate from quantized gate, up
    routed expert  the same, from the score-scaled inputs of the tokens routed to it, or from a
                   coverage policy's tokens when too few were routed (below)

Full-precision targets (recipe `gptq.fp_target`): the client asks for a paired stream, and every
module's statistics pair the two streams' inputs for the same tokens (X_q^T X_r besides
X_q^T X_q). GPTQ then makes the quantized module reproduce the source model's output, not the
source weights applied to the already-perturbed inputs (gptq.fp_target_weight).

Router-aware rounding (recipe `gptq.router_weight`): the modules that write into the residual
stream (o_proj, down_proj) are quantized under an output metric that weighs errors along the
later routers' directions (gptq.router_metric): those errors flip later experts' choices, which
is where most of a top-1 MoE's divergence comes from. The directions are read once from the
checkpoint: every MoE layer's router rows, centred over its experts, times its post-attention
norm weight.

Coverage: with top-1 routing each expert sees about 1/E of the tokens and a rare one almost
none. Per expert the statistics come from (in order): every token, if `all_experts`; the routed
tokens, if there are at least `min_tokens`; else the recipe's fallback (all tokens' inputs, each
scaled by this expert's own router score, or round-to-nearest). The choice is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scoutq.calibrate.statistics import InputStatistics
from scoutq.errors import ScoutqError
from scoutq.model.moe import swiglu_intermediate
from scoutq.quant import primitives
from scoutq.quant.clip import clip_quantize
from scoutq.quant.gptq import fp_target_weight, gptq_quantize, output_coupling, router_metric
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import PlannedModule, QuantPlan
from scoutq.quant.recipe import ClipSettings, Fallback, GptqSettings, Method, Recipe
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme
from scoutq.stream.hooks import ExpertInput, ModuleInput, ProgressFn, StreamClient, Weights
from scoutq.stream.walk import HEAD_ROW_BLOCK, Hidden, LayerStream

# Why an expert's statistics came from where they did (coverage.json's `policy`).
ROUTED, ALL_EXPERTS, ALL_EXPERTS_FALLBACK, RTN_FALLBACK = "routed", "all_experts", "all_experts_fallback", "rtn_fallback"
NOT_QUANTIZED = "not_quantized"


@dataclass(frozen=True)
class CalibrationSettings:
    """The recipe's algorithm and coverage settings, as the calibration client uses them."""

    method: Method
    gptq: GptqSettings = field(default_factory=GptqSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)
    all_experts: bool = False
    min_tokens: int = 32
    fallback: Fallback = Fallback.ALL_EXPERTS

    @property
    def signed_scales(self) -> bool:
        """Whether the method's scales are signed (primitives.signed_scale)."""
        return self.gptq.signed_scales if self.method == Method.GPTQ else self.clip.signed_scales

    @property
    def paired(self) -> bool:
        """Whether a reference stream runs beside the quantized one (fp_target)."""
        return self.method == Method.GPTQ and self.gptq.fp_target

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> CalibrationSettings:
        calibration = recipe.calibration
        if calibration is None:
            raise ValueError(f"recipe {recipe.name!r} is not calibrated (method {recipe.method.value})")
        return cls(recipe.method, recipe.gptq or GptqSettings(), recipe.clip or ClipSettings(),
                   calibration.all_experts, calibration.min_tokens, calibration.fallback)


@dataclass
class ExpertCoverage:
    expert: int
    routed_tokens: int  # tokens the router sent here (over all top-k slots)
    statistics_tokens: int  # tokens its statistics were computed from
    policy: str


@dataclass
class LayerResult:
    """A calibrated layer: its quantized modules and who saw what."""

    layer: int
    quantized: dict[str, PackedWeight] = field(default_factory=dict)
    experts: list[ExpertCoverage] = field(default_factory=list)
    tokens: int = 0


class CalibratingClient(StreamClient):
    """Quantizes each module the plan names as the stream reaches it; see the module docstring."""

    def __init__(self, stream: LayerStream, plan: QuantPlan, settings: CalibrationSettings,
                 on_progress: ProgressFn | None = None):
        # The client reads weights and config through the stream it drives, so it attaches itself
        # to that stream rather than being passed to it.
        stream.client = self
        self.stream = stream
        self.settings = settings
        self.paired = settings.paired
        self.items: dict[str, PlannedModule] = {item.module.name: item for item in plan.items}
        self.on_progress = on_progress
        self.result = LayerResult(-1)
        self._router_directions: dict[int, torch.Tensor] | None = None  # MoE layer -> [E, D]
        self._couplings: dict[int, torch.Tensor | None] = {}  # first router layer -> coupling

    def progress(self, what: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(what, done, total)

    def calibrate_layer(self, index: int, hidden: Hidden) -> tuple[Hidden, LayerResult]:
        """Run layer `index` through the stream, quantizing as it goes."""
        self.result = LayerResult(index, tokens=hidden.main.shape[0] * hidden.main.shape[1])
        self._residual_coupling(index + 1)  # now, while little is resident, not beside a Hessian
        return self.stream.layer(index, hidden), self.result

    # -- the stream's hooks ---------------------------------------------------------------------

    def linears(self, names: tuple[str, ...], weights: Weights, inputs: ModuleInput) -> Weights:
        stats = self._statistics(inputs.x, inputs.reference, *names)
        return tuple(self._quantize(name, weight, stats, inputs.writes_residual_before)
                     for name, weight in zip(names, weights, strict=True))

    def mlp(self, names: tuple[str, str, str], weights: Weights, inputs: ModuleInput) -> Weights:
        """Gate and up on the input's statistics, down on the intermediate computed with the
        quantized gate and up (paired: with the reference stream's through the source ones)."""
        gate_name, up_name, down_name = names
        source_gate, source_up, source_down = weights
        stats = self._statistics(inputs.x, inputs.reference, gate_name, up_name)
        gate = self._quantize(gate_name, source_gate, stats)
        up = self._quantize(up_name, source_up, stats)
        down_stats = None
        if self._scheme(down_name) is not None:
            hidden = inputs.swiglu(gate, up)
            down_stats = InputStatistics(hidden.shape[-1], paired=inputs.reference is not None, device=hidden.device)
            down_stats.add_windows(hidden, inputs.reference, lambda xr: swiglu_intermediate(xr, source_gate, source_up),
                                   inputs.windows)
        down = self._quantize(down_name, source_down, down_stats, inputs.writes_residual_before)
        return gate, up, down

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        gate_name, up_name, down_name = names
        source_gate, source_up, source_down = weights
        routed = inputs.x
        policy = self._policy(routed.shape[0], self._scheme(gate_name) is not None)
        rows: torch.Tensor | None = None
        rows_r: torch.Tensor | None = None  # the same tokens in the reference stream
        x, xr, logits, logits_r = inputs.layer_input, inputs.reference_layer_input, inputs.logits, inputs.reference_logits
        if policy in (ALL_EXPERTS, ALL_EXPERTS_FALLBACK) and x is not None and logits is not None:
            # Every token, scaled by this expert's own router score: the input it would see if chosen.
            rows = x * inputs.own_gate(logits)
            rows_r = None if xr is None or logits_r is None else xr * inputs.own_gate(logits_r)
        elif policy == ROUTED:
            rows = routed
            tokens = inputs.tokens
            rows_r = None if xr is None or logits_r is None else xr[tokens] * inputs.own_gate(logits_r[tokens])
        stats = InputStatistics.of(rows, rows_r) if rows is not None and rows.shape[0] else None
        used = stats.tokens if stats is not None else 0
        if policy == ROUTED and used == 0:
            policy = RTN_FALLBACK
        self.result.experts.append(ExpertCoverage(inputs.expert, routed.shape[0], used, policy))

        gate = self._quantize(gate_name, source_gate, stats)
        up = self._quantize(up_name, source_up, stats)
        down_stats = None
        if stats is not None and rows is not None:
            hidden = inputs.swiglu(gate, up) if rows is routed else swiglu_intermediate(rows, gate, up)
            hidden_r = None if rows_r is None else swiglu_intermediate(rows_r, source_gate, source_up)
            down_stats = InputStatistics.of(hidden, hidden_r)
        down = self._quantize(down_name, source_down, down_stats, inputs.writes_residual_before)
        return gate, up, down

    # -- after the last layer -------------------------------------------------------------------

    def head(self, hidden: torch.Tensor) -> dict[str, PackedWeight]:
        """lm_head, if the recipe quantizes it, from the final normed hidden states, in row blocks
        (GPTQ is independent per row)."""
        layout = self.stream.layout
        name = layout.lm_head_key.removesuffix(".weight")
        scheme = self._scheme(name)
        if scheme is None:
            return {}
        stats = InputStatistics.of(self.stream.final_normed(hidden))
        checkpoint = self.stream.checkpoint
        rows_total, columns = checkpoint.info(layout.lm_head_key).shape
        parts: list[PackedWeight] = []
        for start in range(0, rows_total, HEAD_ROW_BLOCK):
            rows = checkpoint.read_rows(layout.lm_head_key, start, min(start + HEAD_ROW_BLOCK, rows_total))
            parts.append(self._pack(name, rows.to(self.stream.device).float(), stats, rows.dtype))
        zero = [p.zero_point for p in parts]
        merged = PackedWeight(
            scheme,
            torch.cat([p.packed for p in parts]),
            torch.cat([p.scale for p in parts]),
            None if zero[0] is None else torch.cat(zero),  # type: ignore[arg-type]
            (rows_total, columns),
        )
        return {name: merged}

    # -- quantizing one module ------------------------------------------------------------------

    def _scheme(self, name: str) -> Scheme | None:
        item = self.items.get(name)
        return item.scheme if item is not None else None

    def _statistics(self, x: torch.Tensor, reference: torch.Tensor | None, *names: str) -> InputStatistics | None:
        """Statistics of an input shared by `names`, if any of them is quantized."""
        if not any(self._scheme(name) for name in names):
            return None
        return InputStatistics.of(x, reference)

    def _policy(self, routed: int, quantized: bool) -> str:
        if not quantized:
            return NOT_QUANTIZED
        settings = self.settings
        if settings.all_experts:
            return ALL_EXPERTS
        if routed >= max(settings.min_tokens, 1):
            return ROUTED
        return ALL_EXPERTS_FALLBACK if settings.fallback == Fallback.ALL_EXPERTS else RTN_FALLBACK

    def _quantize(self, name: str, weight: torch.Tensor, stats: InputStatistics | None,
                  writes_residual_before: int | None = None) -> torch.Tensor:
        """Quantize module `name` if the plan says so; returns the weight to compute with from
        here on (dequantized as stored, or the source weight)."""
        if self._scheme(name) is None:
            return weight
        dtype = self.stream.weights.stored_dtype(name)
        packed = self._pack(name, weight, stats, dtype, writes_residual_before)
        self.result.quantized[name] = packed
        return packed.reconstructed()

    def _pack(self, name: str, weight: torch.Tensor, stats: InputStatistics | None, source_dtype: torch.dtype,
              writes_residual_before: int | None = None) -> PackedWeight:
        scheme = self._scheme(name)
        assert scheme is not None
        what = f"{self.stream.checkpoint.directory}: {name}"
        if not bool(torch.isfinite(weight).all()):
            raise ScoutqError(f"{what} contains NaN or Inf; refusing to quantize it")
        source = weight.to(source_dtype)
        scale_dtype = scheme.scales_dtype(source_dtype)
        if stats is None or stats.tokens == 0:
            return self._round_to_nearest(source, scheme, what)
        if self.settings.method == Method.GPTQ:
            options = self.settings.gptq
            factors = stats.factorized(options, what)
            coupling = None if writes_residual_before is None else self._residual_coupling(writes_residual_before)
            target = source
            if stats.cross is not None:
                target = fp_target_weight(source, stats.hessian, stats.cross, options.fp_target_damp, what)
            return gptq_quantize(target, factors, scheme, scale_dtype, options, what, coupling)
        importance = stats.hessian.diagonal() / stats.tokens
        return clip_quantize(source, importance, scheme, scale_dtype, options=self.settings.clip)

    def _round_to_nearest(self, source: torch.Tensor, scheme: Scheme, what: str) -> PackedWeight:
        """A module without statistics (the `rtn` fallback), in the recipe's scale convention.
        Signed scales take the plain primitives (rtn.py's fast kernels keep the stored format's
        own convention); the fallback is rare, so their speed does not matter."""
        scale_dtype = scheme.scales_dtype(source.dtype)
        if not (self.settings.signed_scales and scheme.symmetric):
            return rtn_quantize(source, scheme, scale_dtype, what=what)
        scale, _ = primitives.compute_qparams(source, scheme, scale_dtype, signed=True)
        return PackedWeight.from_quantized(primitives.quantize(source, scale, None, scheme), scale, None, scheme)

    # -- router-aware rounding ------------------------------------------------------------------

    def _residual_coupling(self, first_layer: int) -> torch.Tensor | None:
        """gptq.output_coupling of the router metric for a weight writing into the residual
        stream read next by layer `first_layer`'s router; None without router_weight or routers."""
        weight = self.settings.gptq.router_weight
        if self.settings.method != Method.GPTQ or weight <= 0:
            return None
        if first_layer not in self._couplings:
            if self._router_directions is None:
                self._router_directions = self._read_router_directions()
            later = [d for layer, d in self._router_directions.items() if layer >= first_layer]
            coupling = output_coupling(router_metric(torch.cat(later), weight)) if later else None
            # At most two resident: o_proj's (routers from this layer on) and down_proj's (after it).
            self._couplings = {k: v for k, v in self._couplings.items() if k >= first_layer - 1}
            self._couplings[first_layer] = coupling
        return self._couplings[first_layer]

    def _read_router_directions(self) -> dict[int, torch.Tensor]:
        """Per MoE layer, its router rows centred over experts, times its post-attention norm
        weight: the residual-stream directions whose errors move that router's choice [E, D]."""
        config, layout, weights = self.stream.config, self.stream.layout, self.stream.weights
        directions = {}
        for layer in range(config.num_hidden_layers):
            if config.is_moe_layer(layer):
                router = weights.tensor(layout.layer_key(layer, "feed_forward.router.weight"))
                norm = weights.tensor(layout.layer_key(layer, "post_attention_layernorm.weight"))
                directions[layer] = (router - router.mean(0, keepdim=True)) * norm
        return directions
