"""The Llama 4 text model, top to bottom, in plain PyTorch.

This is the math of transformers' `Llama4ForCausalLM` (llama4-format.md §2), written to be read:

    tokens -> embed -> [ x + Attn(RMSNorm(x)) ; h + FFN(RMSNorm(h)) ] x L -> RMSNorm -> lm_head

Attention: grouped-query, RoPE on most layers in the interleaved-pair (complex) convention with
llama3 frequency scaling, a weightless RMS "QK norm" after RoPE, and a chunked causal mask; every
4th layer is NoPE (no RoPE, no QK norm, full causal mask, query temperature tuning).
FFN: the MoE block of moe.py on MoE layers, a dense SwiGLU MLP elsewhere (Maverick interleaves).

Each decoder layer runs on its own given hidden states and absolute positions, so the same
layers serve the resident model here and a layer-by-layer walk over a checkpoint too large to hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from scoutq.checkpoint.config import RopeConfig, TextConfig
from scoutq.model.moe import MLP, MoE


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, in fp32. Also the weightless QK norm."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


@lru_cache(maxsize=8)
def rope_inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with llama3 long-context scaling when configured.

    llama3 scaling divides low frequencies (wavelength above original_len / low_freq_factor) by
    `factor`, keeps high frequencies, and blends linearly in between. Scout has low = high = 1,
    so there is no blend band: 29 of its 64 frequencies are divided by 16.
    """
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.frequency_factors is not None:  # divisors given outright (a GGUF file's rope_freqs)
        return inv_freq / torch.tensor(rope.frequency_factors, dtype=torch.float32)
    if rope.rope_type != "llama3":
        return inv_freq
    original = rope.original_max_position_embeddings
    low_wavelen = original / rope.low_freq_factor
    high_wavelen = original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    if rope.high_freq_factor != rope.low_freq_factor:
        smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        scaled = torch.where(band, blended, scaled)
    return scaled


def rope_angles(positions: torch.Tensor, head_dim: int, rope: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: [T, head_dim/2] in fp32 for positions [T] (every row
    of the batch at the same positions), [B, T, head_dim/2] for per-row positions [B, T]."""
    inv_freq = rope_inverse_frequencies(head_dim, rope).to(positions.device)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of each head by angle j: the complex convention.

    Llama 4's HF weights are not permuted for the "rotate half" convention (llama4-format.md §2),
    so the pairs are adjacent channels. x: [B, T, heads, head_dim].
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, heads, head_dim/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    if cos.dim() == 2:  # shared positions [T, head_dim/2]: one batch row for all
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """NoPE query scaling 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale)), fp32 [T].

    Equal to 1 for every position below floor_scale - 1 (8191 for Scout).
    """
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def causal_mask(query_positions: torch.Tensor, key_count: int, chunk_size: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True where query i may attend to key j.

    Causal (j <= i); with a chunk size, also only within the same chunk (j // C == i // C).
    """
    keys = torch.arange(key_count, device=query_positions.device)
    visible = keys[None, :] <= query_positions[:, None]
    if chunk_size is not None:
        visible &= (keys[None, :] // chunk_size) == (query_positions[:, None] // chunk_size)
    return visible


def padded_causal_mask(positions: torch.Tensor, padding: torch.Tensor, key_count: int,
                       chunk_size: int | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] mask for left-padded rows: `causal_mask` per row, and no row
    attends to its padding.

    Row b holds padding[b] pad tokens, then its text, so key j sits at position j - padding[b].
    positions: [B, Tq] per-row positions of the queries (pad queries clamped to 0: they attend
    to their row's first real token, which keeps every softmax row finite; their outputs are
    never read).
    """
    keys = torch.arange(key_count, device=positions.device)[None, :] - padding[:, None]  # [B, Tk]
    keys, queries = keys[:, None, :], positions[:, :, None]
    visible = (keys <= queries) & (keys >= 0)
    if chunk_size is not None:
        visible &= torch.div(keys, chunk_size, rounding_mode="floor") == queries // chunk_size
    return visible[:, None]


@dataclass
class KVCache:
    """Keys and values seen so far, per layer: [B, kv_heads, T_past, head_dim] each."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, layers: int) -> KVCache:
        return cls([None] * layers, [None] * layers)

    def length(self) -> int:
        first = self.keys[0] if self.keys else None
        return 0 if first is None else first.shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None and past_v is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.use_rope = config.use_rope[layer]
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.chunk_size = config.attention_chunk_size if config.chunked_attention[layer] else None
        self.floor_scale, self.attn_scale, self.eps = config.floor_scale, config.attn_scale, config.rms_norm_eps
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        positions: torch.Tensor,  # [T] absolute positions of these tokens
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin for these positions
        cache: KVCache | None = None,
        padding: torch.Tensor | None = None,  # [B] left-pad tokens per row (positions then [B, T])
    ) -> torch.Tensor:
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), positions, rope, cache,
                                       padding))

    def attend(
        self,
        q: torch.Tensor,  # [B, T, heads * head_dim], q_proj's output
        k: torch.Tensor,  # [B, T, kv_heads * head_dim]
        v: torch.Tensor,  # [B, T, kv_heads * head_dim]
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything between the projections: RoPE, QK norm, temperature, masked softmax
        attention. Returns o_proj's input [B, T, heads * head_dim]. Separate from forward so the
        layer stream can quantize o_proj after seeing its input.

        positions are [T] (every row starts at position 0) or, with `padding` (left-pad tokens
        per row, for batched generation of prompts of different lengths), [B, T] per row."""
        batch, length, _ = q.shape
        q = q.view(batch, length, self.heads, self.head_dim)
        k = k.view(batch, length, self.kv_heads, self.head_dim)
        v = v.view(batch, length, self.kv_heads, self.head_dim)

        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.use_qk_norm:  # after RoPE, weightless
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.temperature_tuning:
            scales = temperature_scales(positions, self.floor_scale, self.attn_scale)
            scales = scales[None] if scales.dim() == 1 else scales
            q = (q * scales[:, :, None, None]).to(q.dtype)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        group = self.heads // self.kv_heads  # query heads per KV head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        if padding is None:
            mask = causal_mask(positions, k.shape[2], self.chunk_size)
        else:
            mask = padded_causal_mask(positions, padding, k.shape[2], self.chunk_size)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.feed_forward: nn.Module = (
            MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size_mlp)
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, padding)
        normed = self.post_attention_layernorm(h)
        return h + self.feed_forward(normed.reshape(-1, normed.shape[-1])).view_as(h)


class Llama4ForCausalLM(nn.Module):
    """Llama 4 text model: `model(input_ids [B, T]) -> logits [B, T, vocab]`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of input_ids [B, T], after the cache's tokens when one is given.

        padding: [B] int64, how many tokens at the start of each row are padding (prompts of
        different lengths batched for generation). Each row's text then starts at position 0
        and never attends to its padding; the same counts go with every later call on the cache.
        """
        start = cache.length() if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        if padding is not None:
            padding = padding.to(input_ids.device)
            positions = (positions[None, :] - padding[:, None]).clamp_min(0)
        rope = rope_angles(positions, self.config.head_dim, self.config.rope)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, rope, cache, padding)
        return self.lm_head(self.norm(x))

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.layers))
