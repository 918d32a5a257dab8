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
from scoutq.model.moe import route
from scoutq.pipeline.plan import PlannedModule, QuantPlan
from scoutq.quant.clip import ClipOptions, clip_quantize
from scoutq.quant.gptq import Factorized, GptqOptions, factorize, gptq_quantize
from scoutq.quant.packed import PackedWeight
from scoutq.quant.recipe import Fallback, Method, Recipe
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme

EMBED_READ_WHOLE_BYTES = 256 * 1024 * 1024  # smaller embeddings are read whole, larger row by row
HEAD_ROW_BLOCK = 8192  # lm_head rows quantized per call (GPTQ is independent per row)

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

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> WalkSettings:
        calibration = recipe.calibration
        if calibration is None:
            raise ValueError(f"recipe {recipe.name!r} is not calibrated (method {recipe.method.value})")
        gptq = GptqOptions(**recipe.gptq.model_dump()) if recipe.gptq else GptqOptions()
        clip = ClipOptions(**recipe.clip.model_dump()) if recipe.clip else ClipOptions()
        return cls(recipe.method, gptq, clip, calibration.all_experts, calibration.min_tokens, calibration.fallback)


class InputStatistics:
    """Running X^T X (fp32) and token count of one module input."""

    def __init__(self, features: int):
        self.hessian = torch.zeros(features, features)
        self.tokens = 0
        self._factorized: Factorized | None = None

    def factorized(self, options: GptqOptions, what: str) -> Factorized:
        """GPTQ's factorisation of this Hessian, computed once for all modules sharing the input."""
        if self._factorized is None:
            self._factorized = factorize(self.hessian, options, what)
        return self._factorized

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    @classmethod
    def of(cls, x: torch.Tensor) -> InputStatistics:
        stats = cls(x.shape[-1])
        stats.add(x)
        return stats


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

    def _quantize(
        self, name: str, w: torch.Tensor, stats: InputStatistics | None, source_dtype: torch.dtype, result: LayerResult
    ) -> torch.Tensor:
        """Quantize module `name` if the plan says so; returns the weight the walk computes with
        from here on (dequantized as stored, or the source weight)."""
        scheme = self._scheme(name)
        if scheme is None:
            return w
        what = f"{self.checkpoint.directory}: {name}"
        if not bool(torch.isfinite(w).all()):
            raise ScoutqError(f"{what} contains NaN or Inf; refusing to quantize it")
        source = w.to(source_dtype)
        if stats is None or stats.tokens == 0:
            packed = rtn_quantize(source, scheme, what=what)
        elif self.settings.method == Method.GPTQ:
            factors = stats.factorized(self.settings.gptq, what)
            packed = gptq_quantize(source, factors, scheme, options=self.settings.gptq, what=what)
        else:
            importance = stats.hessian.diagonal() / stats.tokens
            packed = clip_quantize(source, importance, scheme, options=self.settings.clip)
        result.quantized[name] = packed
        return packed.dequantize().float()

    # -- one decoder layer ---------------------------------------------------------------------

    def layer(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, LayerResult]:
        """Quantize layer `index` from hidden states x [S, T, D]; return the next layer's input."""
        if not bool(torch.isfinite(x).all()):
            raise ScoutqError(f"calibration hidden states entering layer {index} contain NaN or Inf")
        result = LayerResult(index, tokens=x.shape[0] * x.shape[1])
        moe = self.config.is_moe_layer(index)
        steps = 2 + (self.config.num_local_experts if moe else 0)
        self.on_progress("attention", 0, steps)
        h = x + self._attention(index, x, result)
        self.on_progress("attention", 1, steps)
        norm = self._weight(self.layout.layer_key(index, "post_attention_layernorm.weight"))
        normed = (rms_normalize(h, self.config.rms_norm_eps) * norm).reshape(-1, h.shape[-1])
        if moe:
            out = self._moe(index, normed, result, steps)
        else:
            out = self._mlp(self.layout.layer_key(index, "feed_forward"), normed, result)
        self.on_progress("done", steps, steps)
        return h + out.view_as(h), result

    def _attention(self, index: int, x: torch.Tensor, result: LayerResult) -> torch.Tensor:
        config, key = self.config, lambda part: self.layout.layer_key(index, part)
        norm = self._weight(key("input_layernorm.weight"))
        normed = rms_normalize(x, config.rms_norm_eps) * norm
        dtype = self.weights.dtype(key("self_attn.q_proj"))

        with torch.device("meta"):
            attention = Attention(config, index)
        stats = InputStatistics.of(normed) if any(self._scheme(key(f"self_attn.{p}_proj")) for p in "qkv") else None
        state = {}
        for p in "qkv":
            state[f"{p}_proj.weight"] = self._quantize(
                key(f"self_attn.{p}_proj"), self._linear(key(f"self_attn.{p}_proj")), stats, dtype, result
            )
            if config.attention_bias:
                state[f"{p}_proj.bias"] = self._weight(key(f"self_attn.{p}_proj.bias"))
        attention.o_proj = nn.Identity()  # the module returns o_proj's input: o_proj is quantized after it
        attention.load_state_dict(state, assign=True, strict=True)

        positions = torch.arange(x.shape[1])
        rope = rope_angles(positions, config.head_dim, config.rope)
        step = self.settings.sequences_per_batch
        with torch.inference_mode():
            o_input = torch.cat([attention(normed[s : s + step], positions, rope) for s in range(0, x.shape[0], step)])
        o_name = key("self_attn.o_proj")
        o_weight = self._quantize(
            o_name,
            self._linear(o_name),
            InputStatistics.of(o_input) if self._scheme(o_name) else None,
            dtype,
            result,
        )
        bias = self._weight(f"{o_name}.bias") if config.attention_bias else None
        return F.linear(o_input, o_weight, bias)

    def _mlp(self, prefix: str, x: torch.Tensor, result: LayerResult) -> torch.Tensor:
        """SwiGLU with quantization in order: gate and up on x's statistics, down on the
        intermediate computed with the quantized gate and up. The shared expert and dense layers."""
        names = {p: f"{prefix}.{p}_proj" for p in ("gate", "up", "down")}
        dtype = self.weights.dtype(names["gate"])
        stats = InputStatistics.of(x) if self._scheme(names["gate"]) or self._scheme(names["up"]) else None
        gate = self._quantize(names["gate"], self._linear(names["gate"]), stats, dtype, result)
        up = self._quantize(names["up"], self._linear(names["up"]), stats, dtype, result)
        hidden = F.silu(x @ gate.t()) * (x @ up.t())
        down_stats = InputStatistics.of(hidden) if self._scheme(names["down"]) else None
        down = self._quantize(names["down"], self._linear(names["down"]), down_stats, dtype, result)
        return hidden @ down.t()

    def _moe(self, index: int, x: torch.Tensor, result: LayerResult, steps: int) -> torch.Tensor:
        config, key = self.config, lambda part: self.layout.layer_key(index, part)
        logits = x @ self._weight(key("feed_forward.router.weight")).t()  # full precision, always
        scores, chosen = route(logits, config.num_experts_per_tok)
        result.routing = chosen
        out = self._mlp(key("feed_forward.shared_expert"), x, result)

        # Group (token, slot) pairs by expert, as the runtime's dispatch does.
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = torch.arange(x.shape[0]).repeat_interleave(config.num_experts_per_tok)[order]
        token_scores = scores.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=config.num_local_experts).tolist()
        start = 0
        for expert, count in enumerate(counts):
            self.on_progress(f"expert {expert}", 2 + expert, steps)
            routed_tokens = tokens[start : start + count]
            routed_inputs = x[routed_tokens] * token_scores[start : start + count, None]  # what the expert multiplies
            start += count
            y = self._expert(index, expert, routed_inputs, x, logits[:, expert], result)
            out.index_add_(0, routed_tokens, y)
        return out

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
        routed_inputs: torch.Tensor,
        x: torch.Tensor,
        expert_logits: torch.Tensor,
        result: LayerResult,
    ) -> torch.Tensor:
        """Quantize one routed expert and return its outputs for its routed tokens."""
        names = {
            p: self.layout.layer_key(index, f"feed_forward.experts.{expert}.{p}_proj") for p in ("gate", "up", "down")
        }
        gate_weight, up_weight, down_weight = self.weights.expert(index, expert)  # one expert resident
        dtype = self.weights.expert_dtype(index)

        policy = self._statistics_source(routed_inputs.shape[0], self._scheme(names["gate"]) is not None)
        if policy in (ALL_EXPERTS, ALL_EXPERTS_FALLBACK):
            # Every token, scaled by this expert's own router score: the input it would see if chosen.
            inputs = x * torch.sigmoid(expert_logits.float())[:, None]
        elif policy == ROUTED:
            inputs = routed_inputs
        else:
            inputs = None
        stats = InputStatistics.of(inputs) if inputs is not None and inputs.shape[0] else None
        used = stats.tokens if stats is not None else 0
        if policy == ROUTED and used == 0:
            policy = RTN_FALLBACK
        result.experts.append(ExpertCoverage(expert, routed_inputs.shape[0], used, policy))

        gate = self._quantize(names["gate"], gate_weight, stats, dtype, result)
        up = self._quantize(names["up"], up_weight, stats, dtype, result)
        routed_hidden = F.silu(routed_inputs @ gate.t()) * (routed_inputs @ up.t())
        down_stats = None
        if stats is not None and inputs is not None:
            hidden = routed_hidden if inputs is routed_inputs else F.silu(inputs @ gate.t()) * (inputs @ up.t())
            down_stats = InputStatistics.of(hidden)
        down = self._quantize(names["down"], down_weight, down_stats, dtype, result)
        return routed_hidden @ down.t()

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
