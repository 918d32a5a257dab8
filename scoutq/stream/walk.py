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

Each sequence of the batch is a window (hooks.Windows), and everything its hidden states depend
on is computed one window at a time, so a window's values are the same whichever other windows
walk beside it: processes that carry different windows reproduce one process's bytes.
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
from scoutq.model.moe import swiglu_intermediate
from scoutq.stream.hooks import ModuleInput, MoeInputs, StreamClient, Weights, Windows
from scoutq.stream.weights import DenseWeights

EMBED_READ_WHOLE_BYTES = 256 * 1024 * 1024  # smaller embeddings are read whole, larger row by row
HEAD_ROW_BLOCK = 8192  # lm_head rows per block: bounds the [tokens, block] logits


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

        windows = Windows.uniform(x.shape[0], x.shape[1])  # every sequence is a window of its own
        rows, rows_r = x.reshape(-1, x.shape[-1]), None if xr is None else xr.reshape(-1, x.shape[-1])
        attended, attended_r = self._attention(index, rows, rows_r, windows, x.shape[1])
        h = rows + attended
        hr = None if rows_r is None or attended_r is None else rows_r + attended_r
        self.client.progress("attention", 1, steps)

        post_norm = self.layout.layer_key(index, "post_attention_layernorm.weight")
        normed = windows.map(lambda v: self._norm(v, post_norm), h)
        normed_r = None if hr is None else windows.map(lambda v: self._norm(v, post_norm), hr)
        if moe:
            out, out_r = self._moe(index, normed, normed_r, windows, steps)
        else:
            out, out_r = self._mlp(index, "feed_forward", normed, normed_r, windows)
        self.client.progress("done", steps, steps)
        return Hidden((h + out).view_as(x), None if hr is None or out_r is None else (hr + out_r).view_as(x))

    def _attention(
        self, index: int, x: torch.Tensor, xr: torch.Tensor | None, windows: Windows, length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention's output rows for both streams (the reference one through the source weights)."""
        key = partial(self.layout.layer_key, index)
        normed = windows.map(lambda v: self._norm(v, key("input_layernorm.weight")), x)
        normed_r = None if xr is None else windows.map(lambda v: self._norm(v, key("input_layernorm.weight")), xr)
        names = tuple(key(f"self_attn.{p}_proj") for p in "qkvo")
        biases = [self.weights.tensor(f"{n}.bias") for n in names] if self.config.attention_bias else [None] * 4

        source_qkv = tuple(self.weights.linear(n) for n in names[:3])
        qkv = self.client.linears(names[:3], source_qkv, ModuleInput(normed, normed_r, windows=windows))
        o_input = self._attention_core(index, qkv, biases, normed, windows, length)
        o_input_r = None if normed_r is None else self._attention_core(index, source_qkv, biases, normed_r, windows,
                                                                       length)
        del qkv, source_qkv

        source_o = self.weights.linear(names[3])
        inputs = ModuleInput(o_input, o_input_r, writes_residual_before=index, windows=windows)
        (o,) = self.client.linears(names[3:], (source_o,), inputs)
        out_r = None if o_input_r is None else windows.map(lambda v: F.linear(v, source_o, biases[3]), o_input_r)
        return windows.map(lambda v: F.linear(v, o, biases[3]), o_input), out_r

    def _attention_core(
        self, index: int, qkv: Weights, biases: list[torch.Tensor | None], normed: torch.Tensor, windows: Windows,
        length: int,
    ) -> torch.Tensor:
        """llama4.Attention up to o_proj's input, one window (sequence) at a time."""
        with torch.device("meta"):
            attention = Attention(self.config, index)
        attention.o_proj = nn.Identity()
        state = {f"{p}_proj.weight": w for p, w in zip("qkv", qkv, strict=True)}
        state |= {f"{p}_proj.bias": b for p, b in zip("qkv", biases, strict=False) if b is not None}
        attention.load_state_dict(state, assign=True, strict=True)
        positions = torch.arange(length, device=normed.device)
        rope = rope_angles(positions, self.config.head_dim, self.config.rope)
        with torch.inference_mode():
            return windows.map(lambda v: attention(v.view(1, length, -1), positions, rope).view(length, -1), normed)

    def _mlp(
        self, layer: int, module: str, x: torch.Tensor, xr: torch.Tensor | None, windows: Windows
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A SwiGLU block (the shared expert, a dense layer's MLP) for both streams."""
        names = tuple(self.layout.layer_key(layer, f"{module}.{p}_proj") for p in ("gate", "up", "down"))
        source = tuple(self.weights.linear(n) for n in names)
        inputs = ModuleInput(x, xr, writes_residual_before=layer + 1, windows=windows)
        gate, up, down = self.client.mlp(names, source, inputs)  # type: ignore[arg-type]
        out = windows.map(lambda v: v @ down.t(), inputs.swiglu(gate, up))
        out_r = None if xr is None else windows.map(partial(_swiglu, weights=source), xr)
        return out, out_r

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Module names of routed expert `expert`'s gate, up and down in layer `layer`."""
        key = self.layout.layer_key
        return tuple(key(layer, f"feed_forward.experts.{expert}.{p}_proj") for p in ("gate", "up", "down"))  # type: ignore[return-value]

    def _moe(
        self, index: int, x: torch.Tensor, xr: torch.Tensor | None, windows: Windows, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Router (full precision, always), shared expert, then each routed expert in turn."""
        config = self.config
        router = self.weights.tensor(self.layout.layer_key(index, "feed_forward.router.weight"))
        logits = windows.map(lambda v: F.linear(v, router), x)
        logits_r = None if xr is None else windows.map(lambda v: F.linear(v, router), xr)
        moe = MoeInputs.route(index, x, windows, logits, config.num_experts_per_tok, xr, logits_r)
        self.client.routing(index, moe.chosen)
        out, out_r = self._mlp(index, "feed_forward.shared_expert", x, xr, windows)

        self.client.before_experts(moe)
        for expert in range(config.num_local_experts):
            self.client.progress(f"expert {expert}", 2 + expert, steps)
            source = self.weights.expert(index, expert)  # one expert resident
            inputs = moe.expert(expert)
            gate, up, down = self.client.expert(self.expert_names(index, expert), source, inputs)  # type: ignore[arg-type]
            out.index_add_(0, inputs.tokens, inputs.windows.map(partial(torch.matmul, other=down.t()),
                                                                inputs.swiglu(gate, up)))
            if out_r is not None and moe.reference is not None:
                tokens_r, rows_r, windows_r = moe.reference_routed(expert)
                out_r.index_add_(0, tokens_r, windows_r.map(partial(_swiglu, weights=source), rows_r))
        return out, out_r


def _swiglu(x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """down(silu(gate x) * up x) of one window's rows: the reference stream's SwiGLU."""
    gate, up, down = weights
    return swiglu_intermediate(x, gate, up) @ down.t()
