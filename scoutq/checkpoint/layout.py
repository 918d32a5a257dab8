"""Llama 4 key layout: which role each checkpoint key plays, and the shapes config.json implies.

Two Hugging Face layouts exist (llama4-format.md §1.5-1.6):

* multimodal `Llama4ForConditionalGeneration`: text keys under `language_model.model.`,
  `language_model.lm_head.weight`, plus `vision_model.*` and `multi_modal_projector.*`;
* text-only `Llama4ForCausalLM`: `model.*` and `lm_head.weight`.

Routed experts are stored fused as `experts.gate_up_proj` [E, D, 2F] (gate half first, then up)
and `experts.down_proj` [E, F, D], with no `.weight` suffix. Quantized checkpoints instead carry
per-expert keys `experts.{e}.{gate,up,down}_proj.<suffix>`; both are recognised here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from scoutq.checkpoint.config import TextConfig


class Role(StrEnum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    FINAL_NORM = "final_norm"
    INPUT_NORM = "input_norm"
    POST_ATTN_NORM = "post_attn_norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ROUTER = "router"
    EXPERTS_GATE_UP = "experts_gate_up"  # fused [E, D, 2F]: gate and up of every routed expert
    EXPERTS_DOWN = "experts_down"  # fused [E, F, D]
    EXPERT_GATE = "expert_gate"  # per-expert 2-D keys (quantized checkpoints)
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    MLP_GATE = "mlp_gate"  # dense MLP of non-MoE layers (Maverick)
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    VISION = "vision"
    PROJECTOR = "projector"
    UNKNOWN = "unknown"


NORM_ROLES = frozenset({Role.FINAL_NORM, Role.INPUT_NORM, Role.POST_ATTN_NORM})
ROUTED_EXPERT_ROLES = frozenset(
    {Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN, Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN}
)

_LAYER_PARTS: dict[str, Role] = {
    "input_layernorm": Role.INPUT_NORM,
    "post_attention_layernorm": Role.POST_ATTN_NORM,
    "self_attn.q_proj": Role.ATTN_Q,
    "self_attn.k_proj": Role.ATTN_K,
    "self_attn.v_proj": Role.ATTN_V,
    "self_attn.o_proj": Role.ATTN_O,
    "feed_forward.router": Role.ROUTER,
    "feed_forward.shared_expert.gate_proj": Role.SHARED_GATE,
    "feed_forward.shared_expert.up_proj": Role.SHARED_UP,
    "feed_forward.shared_expert.down_proj": Role.SHARED_DOWN,
    "feed_forward.gate_proj": Role.MLP_GATE,
    "feed_forward.up_proj": Role.MLP_UP,
    "feed_forward.down_proj": Role.MLP_DOWN,
}
_PER_EXPERT: dict[str, Role] = {"gate_proj": Role.EXPERT_GATE, "up_proj": Role.EXPERT_UP, "down_proj": Role.EXPERT_DOWN}

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_FUSED_EXPERTS = re.compile(r"^feed_forward\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_KEY = re.compile(r"^feed_forward\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


@dataclass(frozen=True)
class KeyRole:
    role: Role
    layer: int | None = None
    expert: int | None = None
    suffix: str | None = None  # "weight", "weight_packed", "weight_scale", ... (None for fused experts)


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one checkpoint layout."""

    name: str  # "multimodal" or "text"
    model_prefix: str  # prefix of embed_tokens / layers / norm
    lm_head_key: str

    def layer_key(self, layer: int, part: str) -> str:
        return f"{self.model_prefix}layers.{layer}.{part}"

    @property
    def embed_key(self) -> str:
        return f"{self.model_prefix}embed_tokens.weight"

    @property
    def norm_key(self) -> str:
        return f"{self.model_prefix}norm.weight"

    def gate_up_key(self, layer: int) -> str:
        return self.layer_key(layer, "feed_forward.experts.gate_up_proj")

    def down_key(self, layer: int) -> str:
        return self.layer_key(layer, "feed_forward.experts.down_proj")

    def expert_key(self, layer: int, expert: int, proj: str, suffix: str = "weight") -> str:
        return self.layer_key(layer, f"feed_forward.experts.{expert}.{proj}_proj.{suffix}")

    def classify(self, key: str) -> KeyRole:
        """The role of a checkpoint key in this layout."""
        if key.startswith("vision_model."):
            return KeyRole(Role.VISION)
        if key.startswith("multi_modal_projector."):
            return KeyRole(Role.PROJECTOR)
        if key == self.lm_head_key:
            return KeyRole(Role.LM_HEAD, suffix="weight")
        if not key.startswith(self.model_prefix):
            return KeyRole(Role.UNKNOWN)
        rest = key[len(self.model_prefix) :]
        if rest == "embed_tokens.weight":
            return KeyRole(Role.EMBED, suffix="weight")
        if rest == "norm.weight":
            return KeyRole(Role.FINAL_NORM, suffix="weight")
        match = _LAYER_KEY.match(rest)
        if not match:
            return KeyRole(Role.UNKNOWN)
        layer, part = int(match.group(1)), match.group(2)
        if fused := _FUSED_EXPERTS.match(part):
            role = Role.EXPERTS_GATE_UP if fused.group(1) == "gate_up_proj" else Role.EXPERTS_DOWN
            return KeyRole(role, layer=layer)
        if per_expert := _EXPERT_KEY.match(part):
            return KeyRole(
                _PER_EXPERT[per_expert.group(2)], layer=layer, expert=int(per_expert.group(1)), suffix=per_expert.group(3)
            )
        module, _, suffix = part.rpartition(".")
        role = _LAYER_PARTS.get(module)
        if role is None:
            return KeyRole(Role.UNKNOWN, layer=layer)
        return KeyRole(role, layer=layer, suffix=suffix)


MULTIMODAL = Layout("multimodal", "language_model.model.", "language_model.lm_head.weight")
TEXT_ONLY = Layout("text", "model.", "lm_head.weight")


def detect_layout(keys: list[str] | set[str]) -> Layout | None:
    """Pick the layout whose embedding key is present; None if neither is."""
    names = set(keys)
    for layout in (MULTIMODAL, TEXT_ONLY):
        if layout.embed_key in names or any(k.startswith(layout.model_prefix + "layers.") for k in names):
            return layout
    return None


def expected_text_shapes(config: TextConfig, layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every text tensor of a bf16 source checkpoint and the shape config.json implies for it."""
    d, f, f_mlp, e = config.hidden_size, config.intermediate_size, config.intermediate_size_mlp, config.num_local_experts
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {layout.embed_key: (config.vocab_size, d), layout.norm_key: (d,)}
    if not config.tie_word_embeddings:
        shapes[layout.lm_head_key] = (config.vocab_size, d)
    for layer in range(config.num_hidden_layers):
        parts: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q_width, d),
            "self_attn.k_proj.weight": (kv_width, d),
            "self_attn.v_proj.weight": (kv_width, d),
            "self_attn.o_proj.weight": (d, q_width),
        }
        if config.is_moe_layer(layer):
            parts |= {
                "feed_forward.router.weight": (e, d),
                "feed_forward.experts.gate_up_proj": (e, d, 2 * f),
                "feed_forward.experts.down_proj": (e, f, d),
                "feed_forward.shared_expert.gate_proj.weight": (f, d),
                "feed_forward.shared_expert.up_proj.weight": (f, d),
                "feed_forward.shared_expert.down_proj.weight": (d, f),
            }
        else:
            parts |= {
                "feed_forward.gate_proj.weight": (f_mlp, d),
                "feed_forward.up_proj.weight": (f_mlp, d),
                "feed_forward.down_proj.weight": (d, f_mlp),
            }
        shapes |= {layout.layer_key(layer, part): shape for part, shape in parts.items()}
    return shapes


def expected_vision_shapes(vision: dict[str, Any], text_hidden: int) -> dict[str, tuple[int, ...]]:
    """The vision tower and projector tensors of the multimodal layout (llama4-format.md §1.7)."""
    h, inter = int(vision["hidden_size"]), int(vision["intermediate_size"])
    patch = int(vision.get("patch_size", 14))
    patches = (int(vision.get("image_size", 336)) // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.class_embedding": (h,),
        "vision_model.positional_embedding_vlm": (patches, h),
        "vision_model.patch_embedding.linear.weight": (h, int(vision.get("num_channels", 3)) * patch**2),
        "vision_model.layernorm_pre.weight": (h,),
        "vision_model.layernorm_pre.bias": (h,),
        "vision_model.layernorm_post.weight": (h,),
        "vision_model.layernorm_post.bias": (h,),
    }
    for i in range(int(vision["num_hidden_layers"])):
        prefix = f"vision_model.model.layers.{i}."
        for proj in "qkvo":
            shapes[f"{prefix}self_attn.{proj}_proj.weight"] = (h, h)
            shapes[f"{prefix}self_attn.{proj}_proj.bias"] = (h,)
        shapes |= {
            f"{prefix}mlp.fc1.weight": (inter, h),
            f"{prefix}mlp.fc1.bias": (inter,),
            f"{prefix}mlp.fc2.weight": (h, inter),
            f"{prefix}mlp.fc2.bias": (h,),
        }
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{prefix}{norm}.weight"] = (h,)
            shapes[f"{prefix}{norm}.bias"] = (h,)
    projector_in, projector_out = int(vision["projector_input_dim"]), int(vision["projector_output_dim"])
    shapes["vision_model.vision_adapter.mlp.fc1.weight"] = (projector_in, inter)
    shapes["vision_model.vision_adapter.mlp.fc2.weight"] = (projector_out, projector_out)
    shapes["multi_modal_projector.linear_1.weight"] = (text_hidden, int(vision["vision_output_dim"]))
    return shapes
