"""The layer stream: a batch of token windows through a checkpoint, one decoder layer at a time.

    embed(tokens) ─▶ layer 0 ─▶ layer 1 ─▶ … ─▶ final norm ─▶ lm_head in row blocks
                       │
                       ├─ x + Attention(RMSNorm(x))     q, k, v, then o (the client sees o's input)
                       └─ h + FFN(RMSNorm(h))           MoE: router (full precision), shared
                                                        expert, routed experts one at a time

Only one layer's non-expert weights and one routed expert's weights are resident; the hidden
states [S, T, D] (fp32) are all that is carried from one layer to the next, so peak memory is
one layer's working set plus the hidden states, never the model. Weights come from the
checkpoint through positioned reads (weights.py), dequantized when the checkpoint is a
quantized one, so the same stream walks a bf16 source and a scoutq output. Weights and hidden
states live on the stream's device (a GPU, or the CPU); reads stay streamed through the CPU.

The math is model/'s own: the attention module of llama4.py (weights assigned, o_proj applied
after the client has seen its input), RMSNorm's normalisation, and moe.py's routing and
expert grouping. At each group of modules a client (hooks.py) chooses the weights the stream
computes with from there on: calibration quantizes them from the inputs it is shown, so every
later layer sees the errors of the layers before it; evaluation keeps them and records the
routing. Arithmetic is fp32 throughout (bf16 matmuls are very slow on CPUs without native bf16).

With a paired client a reference stream runs beside the main one through the source weights,
routing by its own router; every input the client is shown comes with the same tokens in the
reference stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ScoutqError
from scoutq.model.llama4 import Attention, rms_normalize, rope_angles
from scoutq.model.moe import ExpertGroups, route, swiglu_intermediate
from scoutq.stream.hooks import ExpertInput, ModuleInput, StreamClient, Weights
from scoutq.stream.weights import DenseWeights

EMBED_READ_WHOLE_BYTES = 256 * 1024 * 1024  # smaller embeddings are read whole, larger row by row
HEAD_ROW_BLOCK = 8192  # lm_head rows per block: bounds the [tokens, block] logits
REFERENCE_TOKEN_BLOCK = 4096  # tokens per block of the reference SwiGLU (its widest activation)
SEQUENCES_PER_BATCH = 4  # attention runs this many sequences at once (bounds its [T, T] scores)


@dataclass
class Hidden:
    """Hidden states [S, T, D] fp32 between layers: the main stream, and the reference stream
    through the source weights when the client is paired."""

    main: torch.Tensor
    reference: torch.Tensor | None = None


class LayerStream:
    """Walks one checkpoint layer by layer for one client; see the module docstring."""

    def __init__(self, checkpoint: Checkpoint, client: StreamClient | None = None,
                 device: torch.device | str = "cpu"):
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.layout = checkpoint.layout
        self.device = torch.device(device)
        self.weights = DenseWeights(checkpoint, self.device)
        self.client = client or StreamClient()

    def _norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """RMSNorm with the stored weight `key` (llama4.RMSNorm's math)."""
        return rms_normalize(x, self.config.rms_norm_eps) * self.weights.tensor(key)

    # -- in and out -----------------------------------------------------------------------------

    def start(self, tokens: torch.Tensor) -> Hidden:
        """The hidden states entering layer 0 for token windows [S, T] (both streams, when paired)."""
        x = self.embed(tokens.to(self.device))
        return Hidden(x, x.clone() if self.client.paired else None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of tokens [S, T] -> [S, T, D] fp32; a large table is read row by row."""
        info = self.checkpoint.info(self.layout.embed_key)
        if info.nbytes <= EMBED_READ_WHOLE_BYTES:
            return self.weights.tensor(info.name)[tokens]
        ids = torch.unique(tokens)
        if int(ids.max()) >= info.shape[0]:
            raise ScoutqError(f"token id {int(ids.max())} is outside the embedding ({info.shape[0]} rows)")
        rows = torch.stack([self.checkpoint.read_rows(info.name, int(i), int(i) + 1)[0] for i in ids]).to(self.device)
        rows = rows.float()
        return rows[torch.searchsorted(ids, tokens.contiguous())]

    def final_normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm of hidden states [..., D]: lm_head's input."""
        return self._norm(hidden, self.layout.norm_key)

    def head_rows(self, block: int = HEAD_ROW_BLOCK) -> Iterator[tuple[int, torch.Tensor]]:
        """lm_head (or the tied embedding) as (first row, rows [n, D]) blocks, in the stored dtype
        for a source checkpoint, fp32 dequantized for a quantized one (a fraction of the model)."""
        config = self.config
        key = self.layout.embed_key if config.tie_word_embeddings else self.layout.lm_head_key
        if key in self.checkpoint.tensors:
            rows = config.vocab_size
            for start in range(0, rows, block):
                yield start, self.checkpoint.read_rows(key, start, min(start + block, rows)).to(self.device)
            return
        dense = self.weights.linear(key.removesuffix(".weight"))
        for start in range(0, dense.shape[0], block):
            yield start, dense[start : start + block]

    def logit_blocks(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Logits of hidden states [N, D] over the vocabulary in row blocks: (first id, [N, n] fp32)."""
        normed = self.final_normed(hidden)
        for start, rows in self.head_rows():
            yield start, normed @ rows.float().t()

    # -- one decoder layer ----------------------------------------------------------------------

    def layer(self, index: int, hidden: Hidden) -> Hidden:
        """Run layer `index` on hidden states [S, T, D]; returns the next layer's input."""
        x, xr = hidden.main, hidden.reference
        if self.client.paired and xr is None:
            raise ValueError("a paired client needs the reference stream; start the walk with LayerStream.start")
        for stream in (x, xr):
            if stream is not None and not bool(torch.isfinite(stream).all()):
                raise ScoutqError(f"{self.checkpoint.directory}: hidden states entering layer {index} contain NaN or Inf")
        moe = self.config.is_moe_layer(index)
        steps = 2 + (self.config.num_local_experts if moe else 0)
        self.client.progress("attention", 0, steps)

        attended, attended_r = self._attention(index, x, xr)
        h = x + attended
        hr = None if xr is None or attended_r is None else xr + attended_r
        self.client.progress("attention", 1, steps)

        post_norm = self.layout.layer_key(index, "post_attention_layernorm.weight")
        normed = self._norm(h, post_norm).reshape(-1, h.shape[-1])
        normed_r = None if hr is None else self._norm(hr, post_norm).reshape(normed.shape)
        if moe:
            out, out_r = self._moe(index, normed, normed_r, steps)
        else:
            out, out_r = self._mlp(index, "feed_forward", normed, normed_r)
        self.client.progress("done", steps, steps)
        return Hidden(h + out.view_as(h), None if hr is None or out_r is None else hr + out_r.view_as(hr))

    def _attention(
        self, index: int, x: torch.Tensor, xr: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention's output for both streams (the reference one through the source weights)."""
        key = partial(self.layout.layer_key, index)
        normed = self._norm(x, key("input_layernorm.weight"))
        normed_r = None if xr is None else self._norm(xr, key("input_layernorm.weight"))
        names = tuple(key(f"self_attn.{p}_proj") for p in "qkvo")
        biases = [self.weights.tensor(f"{n}.bias") for n in names] if self.config.attention_bias else [None] * 4

        source_qkv = tuple(self.weights.linear(n) for n in names[:3])
        qkv = self.client.linears(names[:3], source_qkv, ModuleInput(normed, normed_r))
        o_input = self._attention_core(index, qkv, biases, normed)
        o_input_r = None if normed_r is None else self._attention_core(index, source_qkv, biases, normed_r)
        del qkv, source_qkv

        source_o = self.weights.linear(names[3])
        (o,) = self.client.linears(names[3:], (source_o,), ModuleInput(o_input, o_input_r, writes_residual_before=index))
        out_r = None if o_input_r is None else F.linear(o_input_r, source_o, biases[3])
        return F.linear(o_input, o, biases[3]), out_r

    def _attention_core(
        self, index: int, qkv: Weights, biases: list[torch.Tensor | None], normed: torch.Tensor
    ) -> torch.Tensor:
        """llama4.Attention up to o_proj's input, SEQUENCES_PER_BATCH sequences at a time."""
        with torch.device("meta"):
            attention = Attention(self.config, index)
        attention.o_proj = nn.Identity()
        state = {f"{p}_proj.weight": w for p, w in zip("qkv", qkv, strict=True)}
        state |= {f"{p}_proj.bias": b for p, b in zip("qkv", biases, strict=False) if b is not None}
        attention.load_state_dict(state, assign=True, strict=True)
        positions = torch.arange(normed.shape[1], device=normed.device)
        rope = rope_angles(positions, self.config.head_dim, self.config.rope)
        step = SEQUENCES_PER_BATCH
        with torch.inference_mode():
            return torch.cat([attention(normed[s : s + step], positions, rope) for s in range(0, normed.shape[0], step)])

    def _mlp(
        self, layer: int, module: str, x: torch.Tensor, xr: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A SwiGLU block (the shared expert, a dense layer's MLP) for both streams."""
        names = tuple(self.layout.layer_key(layer, f"{module}.{p}_proj") for p in ("gate", "up", "down"))
        source = tuple(self.weights.linear(n) for n in names)
        inputs = ModuleInput(x, xr, writes_residual_before=layer + 1)
        gate, up, down = self.client.mlp(names, source, inputs)  # type: ignore[arg-type]
        out = inputs.swiglu(gate, up) @ down.t()
        out_r = None if xr is None else _blocked_swiglu(xr, *source)
        return out, out_r

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Module names of routed expert `expert`'s gate, up and down in layer `layer`."""
        key = self.layout.layer_key
        return tuple(key(layer, f"feed_forward.experts.{expert}.{p}_proj") for p in ("gate", "up", "down"))  # type: ignore[return-value]

    def _moe(
        self, index: int, x: torch.Tensor, xr: torch.Tensor | None, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router (full precision, always), shared expert, then each routed expert in turn."""
        config = self.config
        router = self.weights.tensor(self.layout.layer_key(index, "feed_forward.router.weight"))
        logits = F.linear(x, router)
        scores, chosen = route(logits, config.num_experts_per_tok)
        self.client.routing(index, chosen)
        groups = ExpertGroups.of(scores, chosen, config.num_local_experts)
        logits_r = groups_r = None
        if xr is not None:  # the reference stream routes by its own router logits
            logits_r = F.linear(xr, router)
            groups_r = ExpertGroups.of(*route(logits_r, config.num_experts_per_tok), config.num_local_experts)
        out, out_r = self._mlp(index, "feed_forward.shared_expert", x, xr)

        def expert_input(expert: int) -> ExpertInput:
            tokens, token_scores = groups.expert(expert)
            return ExpertInput(x[tokens] * token_scores[:, None], None, index + 1, layer=index, expert=expert,
                               tokens=tokens, layer_input=x, logits=logits, reference_layer_input=xr,
                               reference_logits=logits_r)

        self.client.before_experts(index, expert_input)
        for expert in range(config.num_local_experts):
            self.client.progress(f"expert {expert}", 2 + expert, steps)
            source = self.weights.expert(index, expert)  # one expert resident
            inputs = expert_input(expert)
            gate, up, down = self.client.expert(self.expert_names(index, expert), source, inputs)  # type: ignore[arg-type]
            out.index_add_(0, inputs.tokens, inputs.swiglu(gate, up) @ down.t())
            if groups_r is not None and out_r is not None and xr is not None:
                tokens_r, scores_r = groups_r.expert(expert)
                out_r.index_add_(0, tokens_r, _blocked_swiglu(xr[tokens_r] * scores_r[:, None], *source))
        return out, out_r


def _blocked_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) a block of tokens at a time: the reference stream's SwiGLU, whose
    [tokens, intermediate] activation is the widest of the walk."""
    out = torch.empty(x.shape[0], down.shape[0], device=x.device)
    for start in range(0, x.shape[0], REFERENCE_TOKEN_BLOCK):
        out[start : start + REFERENCE_TOKEN_BLOCK] = swiglu_intermediate(x[start : start + REFERENCE_TOKEN_BLOCK],
                                                                        gate, up) @ down.t()
    return out
