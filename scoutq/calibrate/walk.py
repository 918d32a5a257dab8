"""The calibrated layer walk: calibration hidden states flow through the checkpoint one decoder
layer at a time, and each layer is quantized from what its modules really see.

    embed(tokens) ─▶ layer 0 ─▶ layer 1 ─▶ … ─▶ final norm ─▶ (lm_head, if quantized)
                       │
                       ├─ attention: stats on the normed input ─▶ quantize q,k,v ─▶ run them
                       │             stats on o_proj's input ─▶ quantize o ─▶ run it
                       ├─ shared expert / dense MLP: the same, gate and up sharing one input
                       └─ routed experts, one at a time: stats on the *score-scaled* input of the
                          tokens routed to it (what the expert multiplies), quantize gate and up,
                          stats on the intermediate, quantize down, run its tokens

Every output that feeds the next step comes from the already-quantized weights, so each layer
is calibrated on the errors of the layers before it (sequential quantization). The router
always runs in full precision from the source weights. Only one layer's non-expert weights and
one expert's weights are resident; hidden states [samples, seq_len, hidden] in fp32 are the
only thing carried between layers. Arithmetic is fp32 throughout (bf16 matmuls are very slow
on CPUs without native bf16, and statistics want the precision).

Full-precision targets (recipe `gptq.fp_target`): a second stream of hidden states runs through
the source weights beside the quantized one, and every module's statistics pair the two
streams' inputs for the same tokens (X_q^T X_r besides X_q^T X_q). GPTQ then makes the
quantized module reproduce the source model's output, not the source weights applied to the
already-perturbed inputs (gptq.fp_target_weight). Routing of each stream is its own: the
reference stream's routed outputs come from the tokens its router chose.

Router-aware rounding (recipe `gptq.router_weight`): the modules that write into the residual
stream (o_proj, down_proj) are quantized under an output metric that weighs errors along the
later routers' directions (gptq.router_metric): those errors flip later experts' choices,
which is where most of a top-1 MoE's divergence comes from. The directions are read once from
the checkpoint: every MoE layer's router rows, centred over its experts, times its
post-attention norm weight.

Coverage: with top-1 routing each expert sees about 1/E of the tokens and a rare one almost
none. Per expert the statistics come from (in order): every token, if `all_experts`; the routed
tokens, if there are at least `min_tokens`; else the recipe's fallback (all tokens' inputs,
each scaled by this expert's own router score, or round-to-nearest). The choice is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from scoutq.calibrate.weights import DenseWeights
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.rows import read_rows
from scoutq.errors import ScoutqError
from scoutq.model.llama4 import Attention, rms_normalize, rope_angles
from scoutq.model.moe import route, swiglu_intermediate
from scoutq.pipeline.plan import PlannedModule, QuantPlan
from scoutq.quant import primitives
from scoutq.quant.clip import ClipOptions, clip_quantize
from scoutq.quant.gptq import (
    Factorized,
    GptqOptions,
    factorize,
    fp_target_weight,
    gptq_quantize,
    output_coupling,
    router_metric,
)
from scoutq.quant.packed import PackedWeight
from scoutq.quant.recipe import Fallback, Method, Recipe
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme

EMBED_READ_WHOLE_BYTES = 256 * 1024 * 1024  # smaller embeddings are read whole, larger row by row
HEAD_ROW_BLOCK = 8192  # lm_head rows quantized per call (GPTQ is independent per row)
REFERENCE_TOKEN_BLOCK = 4096  # tokens per block of the reference stream's shared expert (fp_target)

# Why an expert's statistics came from where they did (coverage.json's `policy`).
ROUTED, ALL_EXPERTS, ALL_EXPERTS_FALLBACK, RTN_FALLBACK = (
    "routed",
    "all_experts",
    "all_experts_fallback",
    "rtn_fallback",
)
NOT_QUANTIZED = "not_quantized"

ProgressFn = Callable[[str, int, int], None]  # (what is being done, steps done, steps in this layer)


@dataclass(frozen=True)
class WalkSettings:
    method: Method
    gptq: GptqOptions = field(default_factory=GptqOptions)
    clip: ClipOptions = field(default_factory=ClipOptions)
    all_experts: bool = False
    min_tokens: int = 32
    fallback: Fallback = Fallback.ALL_EXPERTS
    sequences_per_batch: int = 4  # attention runs this many sequences at once (bounds its scores)

    @property
    def signed_scales(self) -> bool:
        """Whether the method's scales are signed (primitives.signed_scale)."""
        return self.gptq.signed_scales if self.method == Method.GPTQ else self.clip.signed_scales

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> WalkSettings:
        calibration = recipe.calibration
        if calibration is None:
            raise ValueError(f"recipe {recipe.name!r} is not calibrated (method {recipe.method.value})")
        gptq = GptqOptions(**recipe.gptq.model_dump()) if recipe.gptq else GptqOptions()
        clip = ClipOptions(**recipe.clip.model_dump()) if recipe.clip else ClipOptions()
        return cls(recipe.method, gptq, clip, calibration.all_experts, calibration.min_tokens, calibration.fallback)


class InputStatistics:
    """Running X^T X (fp32) and token count of one module input; with a paired reference input
    (the same tokens through the source weights), also X^T X_r."""

    def __init__(self, features: int, paired: bool = False):
        self.hessian = torch.zeros(features, features)
        self.cross = torch.zeros(features, features) if paired else None
        self.tokens = 0
        self._factorized: Factorized | None = None

    def factorized(self, options: GptqOptions, what: str) -> Factorized:
        """GPTQ's factorisation of this Hessian, computed once for all modules sharing the input."""
        if self._factorized is None:
            self._factorized = factorize(self.hessian, options, what)
        return self._factorized

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(x.t(), x)
        if self.cross is not None:
            if reference is None:
                raise ValueError("paired statistics need the reference input")
            self.cross.addmm_(x.t(), reference.reshape(-1, x.shape[-1]).float())
        self.tokens += x.shape[0]

    @classmethod
    def of(cls, x: torch.Tensor, reference: torch.Tensor | None = None) -> InputStatistics:
        """Statistics of x; paired with `reference` (same rows, source-weight stream) if given."""
        stats = cls(x.shape[-1], paired=reference is not None)
        stats.add(x, reference)
        return stats


@dataclass
class Hidden:
    """Hidden states [S, T, D] fp32 carried between layers: through the quantized layers, and
    (fp_target only) through the source weights."""

    quantized: torch.Tensor
    reference: torch.Tensor | None = None


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
    routing: torch.Tensor | None = None  # [tokens, k] experts each token was routed to (MoE layers)


class _ExpertGroups:
    """(token, slot) pairs grouped by expert, as the runtime's dispatch groups them."""

    def __init__(self, chosen: torch.Tensor, scores: torch.Tensor, num_experts: int):
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        self.tokens = torch.arange(chosen.shape[0]).repeat_interleave(chosen.shape[1])[order]
        self.scores = scores.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=num_experts)
        self.ends = torch.cumsum(counts, 0).tolist()

    def of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens routed to `expert` and their gate values."""
        start = self.ends[expert - 1] if expert else 0
        end = self.ends[expert]
        return self.tokens[start:end], self.scores[start:end]


class LayerWalk:
    """Runs and quantizes one layer at a time; see the module docstring."""

    def __init__(
        self, checkpoint: Checkpoint, plan: QuantPlan | None, settings: WalkSettings,
        on_progress: ProgressFn | None = None
    ):
        """plan None: quantize nothing, only run the layers (the layer-walked evaluation)."""
        self.checkpoint = checkpoint
        self.weights = DenseWeights(checkpoint)
        self.config = checkpoint.config
        self.layout = checkpoint.layout
        self.settings = settings
        self.items: dict[str, PlannedModule] = {item.module.name: item for item in plan.items} if plan else {}
        self.on_progress = on_progress or (lambda _what, _done, _total: None)
        self._router_directions: dict[int, torch.Tensor] | None = None  # MoE layer -> [E, D]
        self._couplings: dict[int, torch.Tensor | None] = {}  # first router layer -> coupling

    # -- reading -------------------------------------------------------------------------------

    def _weight(self, key: str) -> torch.Tensor:
        return self.weights.tensor(key)

    def _linear(self, module: str) -> torch.Tensor:
        return self.weights.linear(module)

    def _scheme(self, name: str) -> Scheme | None:
        item = self.items.get(name)
        return item.scheme if item is not None else None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of the calibration tokens [S, T] -> hidden states [S, T, D] fp32."""
        info = self.checkpoint.info(self.layout.embed_key)
        if info.nbytes <= EMBED_READ_WHOLE_BYTES:
            return self._weight(info.name)[tokens]
        ids = torch.unique(tokens)
        if int(ids.max()) >= info.shape[0]:
            raise ScoutqError(f"calibration token id {int(ids.max())} is outside the embedding ({info.shape[0]} rows)")
        rows = torch.stack([read_rows(info, int(i), int(i) + 1)[0] for i in ids]).float()
        return rows[torch.searchsorted(ids, tokens.contiguous())]

    # -- quantizing one module -----------------------------------------------------------------

    @property
    def paired(self) -> bool:
        """Whether a reference stream runs beside the quantized one (fp_target)."""
        return self.settings.method == Method.GPTQ and self.settings.gptq.fp_target

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
        directions = {}
        for layer in range(self.config.num_hidden_layers):
            if self.config.is_moe_layer(layer):
                router = self._weight(self.layout.layer_key(layer, "feed_forward.router.weight"))
                norm = self._weight(self.layout.layer_key(layer, "post_attention_layernorm.weight"))
                directions[layer] = (router - router.mean(0, keepdim=True)) * norm
        return directions

    def _quantize(
        self, name: str, w: torch.Tensor, stats: InputStatistics | None, source_dtype: torch.dtype, result: LayerResult,
        writes_residual_before: int | None = None,
    ) -> torch.Tensor:
        """Quantize module `name` if the plan says so; returns the weight the walk computes with
        from here on (dequantized as stored, or the source weight). writes_residual_before: the
        first layer whose router reads this module's output (o_proj and down_proj)."""
        scheme = self._scheme(name)
        if scheme is None:
            return w
        what = f"{self.checkpoint.directory}: {name}"
        if not bool(torch.isfinite(w).all()):
            raise ScoutqError(f"{what} contains NaN or Inf; refusing to quantize it")
        source = w.to(source_dtype)
        if stats is None or stats.tokens == 0:
            packed = self._round_to_nearest(source, scheme, what)
        elif self.settings.method == Method.GPTQ:
            options = self.settings.gptq
            factors = stats.factorized(options, what)
            coupling = None if writes_residual_before is None else self._residual_coupling(writes_residual_before)
            target = source
            if stats.cross is not None:
                target = fp_target_weight(source, stats.hessian, stats.cross, options.fp_target_damp, what)
            packed = gptq_quantize(target, factors, scheme, source_dtype, options, what, coupling)
        else:
            importance = stats.hessian.diagonal() / stats.tokens
            packed = clip_quantize(source, importance, scheme, options=self.settings.clip)
        result.quantized[name] = packed
        return packed.dequantize().float()

    def _round_to_nearest(self, source: torch.Tensor, scheme: Scheme, what: str) -> PackedWeight:
        """A module without statistics (the `rtn` fallback), in the recipe's scale convention.
        Signed scales take the plain primitives (rtn.py's fast kernels keep the stored format's
        own convention); the fallback is rare, so their speed does not matter."""
        if not (self.settings.signed_scales and scheme.symmetric):
            return rtn_quantize(source, scheme, what=what)
        scale, _ = primitives.compute_qparams(source, scheme, source.dtype, signed=True)
        return PackedWeight.from_quantized(primitives.quantize(source, scale, None, scheme), scale, None, scheme)

    def _statistics(self, x: torch.Tensor, reference: torch.Tensor | None, *names: str) -> InputStatistics | None:
        """Statistics of an input shared by `names`, if any of them is quantized."""
        if not any(self._scheme(name) for name in names):
            return None
        return InputStatistics.of(x, reference)

    # -- one decoder layer ---------------------------------------------------------------------

    def start(self, tokens: torch.Tensor) -> Hidden:
        """The hidden states entering layer 0 (both streams, when paired)."""
        x = self.embed(tokens)
        return Hidden(x, x.clone() if self.paired else None)

    def layer(self, index: int, hidden: Hidden) -> tuple[Hidden, LayerResult]:
        """Quantize layer `index` from the hidden states [S, T, D]; return the next layer's input."""
        x = hidden.quantized
        xr = hidden.reference if self.paired else None  # from here on, xr is None unless paired
        if self.paired and xr is None:
            raise ValueError("fp_target needs the reference stream; start the walk with LayerWalk.start")
        for stream in (x, xr):
            if stream is not None and not bool(torch.isfinite(stream).all()):
                raise ScoutqError(f"calibration hidden states entering layer {index} contain NaN or Inf")
        result = LayerResult(index, tokens=x.shape[0] * x.shape[1])
        self._residual_coupling(index + 1)  # now, while little is resident, not beside a Hessian
        moe = self.config.is_moe_layer(index)
        steps = 2 + (self.config.num_local_experts if moe else 0)
        self.on_progress("attention", 0, steps)
        attended, attended_r = self._attention(index, x, xr, result)
        h = x + attended
        hr = None if xr is None or attended_r is None else xr + attended_r
        self.on_progress("attention", 1, steps)
        norm = self._weight(self.layout.layer_key(index, "post_attention_layernorm.weight"))
        normed = (rms_normalize(h, self.config.rms_norm_eps) * norm).reshape(-1, h.shape[-1])
        normed_r = None if hr is None else (rms_normalize(hr, self.config.rms_norm_eps) * norm).reshape(normed.shape)
        if moe:
            out, out_r = self._moe(index, normed, normed_r, result, steps)
        else:
            out, out_r = self._mlp(index, "feed_forward", normed, normed_r, result)
        self.on_progress("done", steps, steps)
        following = Hidden(h + out.view_as(h), None if hr is None or out_r is None else hr + out_r.view_as(hr))
        return following, result

    def _attention(
        self, index: int, x: torch.Tensor, xr: torch.Tensor | None, result: LayerResult
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output of both streams (the reference one through the source weights)."""
        config, key = self.config, lambda part: self.layout.layer_key(index, part)
        norm = self._weight(key("input_layernorm.weight"))
        normed = rms_normalize(x, config.rms_norm_eps) * norm
        normed_r = None if xr is None else rms_normalize(xr, config.rms_norm_eps) * norm
        dtype = self.weights.dtype(key("self_attn.q_proj"))

        names = {p: key(f"self_attn.{p}_proj") for p in "qkvo"}
        biases = {p: self._weight(f"{names[p]}.bias") for p in "qkvo"} if config.attention_bias else {}
        stats = self._statistics(normed, normed_r, names["q"], names["k"], names["v"])
        used = {p: self._quantize(names[p], self._linear(names[p]), stats, dtype, result) for p in "qkv"}
        o_input = self._attention_core(index, used, biases, normed)
        del used
        o_input_r = None  # the reference stream re-reads the source weights rather than keep them
        if normed_r is not None:
            source = {p: self._linear(names[p]) for p in "qkv"}
            o_input_r = self._attention_core(index, source, biases, normed_r)
            del source
        o_source = self._linear(names["o"])
        o_stats = self._statistics(o_input, o_input_r, names["o"])
        o_weight = self._quantize(names["o"], o_source, o_stats, dtype, result, writes_residual_before=index)
        bias = biases.get("o")
        out_r = None if o_input_r is None else F.linear(o_input_r, o_source, bias)
        return F.linear(o_input, o_weight, bias), out_r

    def _attention_core(self, index: int, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
                        normed: torch.Tensor) -> torch.Tensor:
        """Attention up to o_proj's input (o_proj is quantized after its input is known)."""
        config = self.config
        with torch.device("meta"):
            attention = Attention(config, index)
        attention.o_proj = nn.Identity()
        state = {f"{p}_proj.weight": weights[p] for p in "qkv"}
        state.update({f"{p}_proj.bias": biases[p] for p in "qkv" if p in biases})
        attention.load_state_dict(state, assign=True, strict=True)
        positions = torch.arange(normed.shape[1])
        rope = rope_angles(positions, config.head_dim, config.rope)
        step = self.settings.sequences_per_batch
        with torch.inference_mode():
            return torch.cat([attention(normed[s : s + step], positions, rope) for s in range(0, normed.shape[0], step)])

    def _mlp(
        self, layer: int, module: str, x: torch.Tensor, xr: torch.Tensor | None, result: LayerResult
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SwiGLU with quantization in order: gate and up on x's statistics, down on the
        intermediate computed with the quantized gate and up. The shared expert and dense layers."""
        names = {p: self.layout.layer_key(layer, f"{module}.{p}_proj") for p in ("gate", "up", "down")}
        dtype = self.weights.dtype(names["gate"])
        stats = self._statistics(x, xr, names["gate"], names["up"])
        gate = self._quantize(names["gate"], self._linear(names["gate"]), stats, dtype, result)
        up = self._quantize(names["up"], self._linear(names["up"]), stats, dtype, result)
        hidden = swiglu_intermediate(x, gate, up)
        del gate, up
        source_down = self._linear(names["down"])
        down_stats = self._statistics(hidden, None, names["down"]) if xr is None else None
        out_r = None
        if xr is not None:
            down_stats, out_r = self._reference_mlp(names, hidden, xr, source_down)
        down = self._quantize(names["down"], source_down, down_stats, dtype, result, writes_residual_before=layer + 1)
        return hidden @ down.t(), out_r

    def _reference_mlp(
        self, names: dict[str, str], hidden: torch.Tensor, xr: torch.Tensor, source_down: torch.Tensor
    ) -> tuple[InputStatistics | None, torch.Tensor]:
        """The reference stream through the source SwiGLU, a block of tokens at a time (its
        intermediate is the widest activation of the walk), pairing down_proj's statistics."""
        gate, up = self._linear(names["gate"]), self._linear(names["up"])  # re-read, not kept
        stats = InputStatistics(hidden.shape[-1], paired=True) if self._scheme(names["down"]) else None
        out_r = torch.empty(xr.shape[0], source_down.shape[0])
        for start in range(0, xr.shape[0], REFERENCE_TOKEN_BLOCK):
            end = start + REFERENCE_TOKEN_BLOCK
            hidden_r = swiglu_intermediate(xr[start:end], gate, up)
            if stats is not None:
                stats.add(hidden[start:end], hidden_r)
            out_r[start:end] = hidden_r @ source_down.t()
        return stats, out_r

    def _moe(
        self, index: int, x: torch.Tensor, xr: torch.Tensor | None, result: LayerResult, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        config, key = self.config, lambda part: self.layout.layer_key(index, part)
        router = self._weight(key("feed_forward.router.weight"))
        logits = x @ router.t()  # full precision, always
        scores, chosen = route(logits, config.num_experts_per_tok)
        result.routing = chosen
        logits_r = None if xr is None else xr @ router.t()
        out, out_r = self._mlp(index, "feed_forward.shared_expert", x, xr, result)

        routed = _ExpertGroups(chosen, scores, config.num_local_experts)
        routed_r = None
        if logits_r is not None:  # the reference stream routes by its own router logits
            scores_r, chosen_r = route(logits_r, config.num_experts_per_tok)
            routed_r = _ExpertGroups(chosen_r, scores_r, config.num_local_experts)
        for expert in range(config.num_local_experts):
            self.on_progress(f"expert {expert}", 2 + expert, steps)
            tokens, token_scores = routed.of(expert)
            routed_inputs = x[tokens] * token_scores[:, None]  # what the expert multiplies
            y, expert_fn = self._expert(index, expert, tokens, routed_inputs, x, xr, logits, logits_r, result)
            out.index_add_(0, tokens, y)
            if routed_r is not None and out_r is not None and xr is not None:  # (all three or none)
                tokens_r, scores_r = routed_r.of(expert)
                out_r.index_add_(0, tokens_r, expert_fn(xr[tokens_r] * scores_r[:, None]))
        return out, out_r

    def _statistics_source(self, count: int, quantized: bool) -> str:
        if not quantized:
            return NOT_QUANTIZED
        settings = self.settings
        if settings.all_experts:
            return ALL_EXPERTS
        if count >= max(settings.min_tokens, 1):
            return ROUTED
        return ALL_EXPERTS_FALLBACK if settings.fallback == Fallback.ALL_EXPERTS else RTN_FALLBACK

    def _expert(
        self,
        index: int,
        expert: int,
        tokens: torch.Tensor,
        routed_inputs: torch.Tensor,
        x: torch.Tensor,
        xr: torch.Tensor | None,
        logits: torch.Tensor,
        logits_r: torch.Tensor | None,
        result: LayerResult,
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Quantize one routed expert; return its outputs for its routed tokens, and the source
        expert as a function (for the reference stream)."""
        names = {
            p: self.layout.layer_key(index, f"feed_forward.experts.{expert}.{p}_proj") for p in ("gate", "up", "down")
        }
        gate_weight, up_weight, down_weight = self.weights.expert(index, expert)  # one expert resident
        dtype = self.weights.expert_dtype(index)

        def source_expert(inputs: torch.Tensor) -> torch.Tensor:
            return swiglu_intermediate(inputs, gate_weight, up_weight) @ down_weight.t()

        def own_gate(stream_logits: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(stream_logits[:, expert].float())[:, None]

        policy = self._statistics_source(routed_inputs.shape[0], self._scheme(names["gate"]) is not None)
        inputs: torch.Tensor | None = None
        inputs_r: torch.Tensor | None = None  # the same tokens in the reference stream
        if policy in (ALL_EXPERTS, ALL_EXPERTS_FALLBACK):
            # Every token, scaled by this expert's own router score: the input it would see if chosen.
            inputs = x * own_gate(logits)
            inputs_r = None if xr is None or logits_r is None else xr * own_gate(logits_r)
        elif policy == ROUTED:
            inputs = routed_inputs
            inputs_r = None if xr is None or logits_r is None else xr[tokens] * own_gate(logits_r[tokens])
        stats = None
        if inputs is not None and inputs.shape[0]:
            stats = InputStatistics.of(inputs, inputs_r)
        used = stats.tokens if stats is not None else 0
        if policy == ROUTED and used == 0:
            policy = RTN_FALLBACK
        result.experts.append(ExpertCoverage(expert, routed_inputs.shape[0], used, policy))

        gate = self._quantize(names["gate"], gate_weight, stats, dtype, result)
        up = self._quantize(names["up"], up_weight, stats, dtype, result)
        routed_hidden = swiglu_intermediate(routed_inputs, gate, up)
        down_stats = None
        if stats is not None and inputs is not None:
            hidden = routed_hidden if inputs is routed_inputs else swiglu_intermediate(inputs, gate, up)
            hidden_r = None if inputs_r is None else swiglu_intermediate(inputs_r, gate_weight, up_weight)
            down_stats = InputStatistics.of(hidden, hidden_r)
        down = self._quantize(names["down"], down_weight, down_stats, dtype, result, writes_residual_before=index + 1)
        return routed_hidden @ down.t(), source_expert

    # -- after the last layer ------------------------------------------------------------------

    def head(self, x: torch.Tensor) -> dict[str, PackedWeight]:
        """lm_head, if the recipe quantizes it, from the final normed hidden states."""
        name = self.layout.lm_head_key.removesuffix(".weight")
        scheme = self._scheme(name)
        if scheme is None:
            return {}
        normed = rms_normalize(x, self.config.rms_norm_eps) * self._weight(self.layout.norm_key)
        stats = InputStatistics.of(normed)
        info = self.checkpoint.info(self.layout.lm_head_key)
        parts: list[PackedWeight] = []
        scratch = LayerResult(-1)
        for start in range(0, info.shape[0], HEAD_ROW_BLOCK):
            rows = read_rows(info, start, min(start + HEAD_ROW_BLOCK, info.shape[0]))
            self._quantize(name, rows.float(), stats, rows.dtype, scratch)
            parts.append(scratch.quantized.pop(name))
        zero = [p.zero_point for p in parts]
        merged = PackedWeight(
            scheme,
            torch.cat([p.packed for p in parts]),
            torch.cat([p.scale for p in parts]),
            None if zero[0] is None else torch.cat(zero),  # type: ignore[arg-type]
            (info.shape[0], info.shape[1]),
        )
        return {name: merged}
