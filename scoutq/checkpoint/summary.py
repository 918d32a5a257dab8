"""What a checkpoint holds, from headers alone: architecture, parameters and bytes by role."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from scoutq.checkpoint.layout import ROUTED_EXPERT_ROLES, Role
from scoutq.checkpoint.reader import Checkpoint

PACKED_SUFFIXES = frozenset({"weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"})


@dataclass(frozen=True)
class RoleTotals:
    role: str
    dtype: str
    tensors: int
    parameters: int
    bytes: int


def summarize(checkpoint: Checkpoint) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint from its headers (for a quantized one, plus
    each module's 16-byte weight_shape, since packed tensors hide the logical shape)."""
    config = checkpoint.config
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    routed_params = text_params = vision_params = 0
    for name, info in checkpoint.tensors.items():
        key_role = checkpoint.classify(name)
        role = key_role.role
        packed = key_role.suffix in PACKED_SUFFIXES or key_role.suffix == "weight_shape"
        entry = totals[(role.value, "packed" if packed else info.dtype)]
        entry[0] += 1
        entry[2] += info.nbytes
        if key_role.suffix in PACKED_SUFFIXES:
            continue  # a quantized weight's parameters are counted once, from its weight_shape
        numel = info.numel
        if key_role.suffix == "weight_shape":  # 16 bytes of data: the logical [out, in]
            numel = math.prod(int(v) for v in checkpoint.read(name).tolist())
        entry[1] += numel
        if role in (Role.VISION, Role.PROJECTOR):
            vision_params += numel
        else:
            text_params += numel
        if role in ROUTED_EXPERT_ROLES:
            routed_params += numel
    # Per token, a MoE layer runs top_k of its E routed experts; everything else always runs
    # (the embedding table is counted whole, as Meta's "17B active" does).
    active = text_params - routed_params + routed_params * config.num_experts_per_tok // max(config.num_local_experts, 1)
    roles = [RoleTotals(role, dtype, *values) for (role, dtype), values in sorted(totals.items())]
    return {
        "directory": str(checkpoint.directory),
        "layout": checkpoint.layout.name,
        "shards": len(checkpoint.shard_files),
        "tensors": len(checkpoint.tensors),
        "quantized": "quantization_config" in checkpoint.config_json,
        "architecture": {
            "layers": config.num_hidden_layers,
            "moe_layers": len(config.moe_layers),
            "dense_layers": config.num_hidden_layers - len(config.moe_layers),
            "nope_layers": sum(not r for r in config.use_rope),
            "hidden_size": config.hidden_size,
            "experts": config.num_local_experts,
            "experts_per_token": config.num_experts_per_tok,
            "expert_width": config.intermediate_size,
            "dense_mlp_width": config.intermediate_size_mlp,
            "attention_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "attention_chunk_size": config.attention_chunk_size,
            "vocab_size": config.vocab_size,
            "rope": asdict(config.rope),
        },
        "parameters": {
            "total": text_params + vision_params,
            "text": text_params,
            "vision": vision_params,
            "active_per_token": active,
        },
        "bytes": sum(info.nbytes for info in checkpoint.tensors.values()),
        "roles": [asdict(r) for r in roles],
    }
