"""Llama 4 text configuration, read from a Hugging Face config.json with its quirks normalised.

The same dataclass describes Scout, Maverick and the tiny fixtures. Quirks handled here, so
that nothing downstream has to know them (see llama4-format.md, notes A and B):

* `attn_temperature_tuning` saved as the integer 4 by older transformers; it means "on".
* RoPE settings either as `rope_theta` + `rope_scaling` (transformers 4.x) or as one
  `rope_parameters` dict holding `rope_theta` (transformers 5.x).
* `no_rope_layers` missing: rebuilt from `no_rope_layer_interval` (every 4th layer is NoPE).
* `moe_layers` missing: rebuilt from `interleave_moe_layer_step` (Maverick uses 2).
* `head_dim` missing: `hidden_size // num_attention_heads`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scoutq.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama4", "llama4_text")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors given outright (a GGUF file's rope_freqs tensor) instead of llama3's
    # parameters; None: computed from rope_type.
    frequency_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int  # width of the dense MLP of non-MoE layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    use_rope: tuple[bool, ...]  # per layer; False = NoPE layer
    chunked_attention: tuple[bool, ...]  # per layer; True = chunked local causal mask
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers


def _coerce_bool(name: str, value: Any) -> bool:
    # Older Llama 4 configs store attn_temperature_tuning as the integer 4 (transformers #37479).
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    raise ConfigError(f"config.json: {name} must be a boolean, got {value!r}")


def _rope_from(text: dict[str, Any]) -> RopeConfig:
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_parameters must be an object, got {params!r}")
    theta = params.get("rope_theta", text.get("rope_theta", 500000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"config.json: rope type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        factors = params.get("frequency_factors")
        return RopeConfig(theta=float(theta), frequency_factors=tuple(float(f) for f in factors) if factors else None)
    try:
        return RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", text.get("max_position_embeddings", 8192))
            ),
        )
    except KeyError as missing:
        raise ConfigError(f"config.json: llama3 rope scaling is missing {missing.args[0]!r}") from None


def text_section(raw: dict[str, Any]) -> dict[str, Any]:
    """The text part of a config.json: `text_config` of a multimodal save, or the whole file."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported; scoutq reads {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "llama4":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json: model_type 'llama4' needs a text_config object")
        return text
    return raw


def parse_text_config(raw: dict[str, Any]) -> TextConfig:
    """Build a TextConfig from a parsed config.json (multimodal or text-only)."""
    try:
        return _parse_text_config(raw)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as bad:
        # A value of the wrong type anywhere (e.g. "vocab_size": "big", "no_rope_layers": 5).
        raise ConfigError(f"config.json: invalid value ({bad})") from None


def _parse_text_config(raw: dict[str, Any]) -> TextConfig:
    text = text_section(raw)
    try:
        hidden = int(text.get("hidden_size", 5120))
        layers = int(text.get("num_hidden_layers", 48))
        heads = int(text.get("num_attention_heads", 40))
        kv_heads = int(text.get("num_key_value_heads") or heads)
        if heads <= 0 or kv_heads <= 0:
            raise ConfigError(
                f"config.json: num_attention_heads ({heads}) and num_key_value_heads ({kv_heads}) must be > 0"
            )
        head_dim = int(text.get("head_dim") or hidden // heads)
        experts = int(text.get("num_local_experts", 16))
        top_k = int(text.get("num_experts_per_tok", 1))
        step = int(text.get("interleave_moe_layer_step", 1))
        interval = int(text.get("no_rope_layer_interval", 4))
    except (TypeError, ValueError) as bad:
        raise ConfigError(f"config.json: {bad}") from None
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"config.json: num_experts_per_tok {top_k} must be between 1 and num_local_experts {experts}")

    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, layers, step)) if step > 0 else []
    # transformers treats a missing *or empty* no_rope_layers as "rebuild from the interval".
    no_rope_layers = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(no_rope_layers) < layers:
        raise ConfigError(f"config.json: no_rope_layers has {len(no_rope_layers)} entries for {layers} layers")
    use_rope = tuple(bool(flag) for flag in no_rope_layers[:layers])
    layer_types = text.get("layer_types")
    if layer_types:
        chunked = tuple(kind == "chunked_attention" for kind in layer_types[:layers])
    else:
        chunked = use_rope  # RoPE layers use chunked local attention, NoPE layers see the whole prefix
    chunk = text.get("attention_chunk_size", 8192)

    return TextConfig(
        vocab_size=int(text.get("vocab_size", 202048)),
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size", 8192)),
        intermediate_size_mlp=int(text.get("intermediate_size_mlp", 16384)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        moe_layers=tuple(int(i) for i in moe_layers),
        use_rope=use_rope,
        chunked_attention=chunked,
        attention_chunk_size=int(chunk) if chunk else None,
        use_qk_norm=_coerce_bool("use_qk_norm", text.get("use_qk_norm", True)),
        attn_temperature_tuning=_coerce_bool("attn_temperature_tuning", text.get("attn_temperature_tuning", True)),
        floor_scale=float(text.get("floor_scale", 8192)),
        attn_scale=float(text.get("attn_scale", 0.1)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope=_rope_from(text),
        hidden_act=str(text.get("hidden_act", "silu")),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))),
        attention_bias=bool(text.get("attention_bias", False)),
        torch_dtype=str(text.get("torch_dtype") or text.get("dtype") or raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        extra={k: v for k, v in text.items()},
    )


def read_config_json(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a Hugging Face checkpoint directory has a config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise ConfigError(f"{path}: not valid JSON ({bad})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def load_text_config(directory: Path) -> TextConfig:
    return parse_text_config(read_config_json(directory))
