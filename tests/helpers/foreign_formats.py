"""Quantized checkpoints in other tools' formats, built from a fixture for the foreign readers' tests.

Each writer follows the producer's documented layout (quantized-formats.md B1, B2, B5; AutoAWQ's
`awq/utils/packing_utils.py` for AWQ's order) and is written here, word by word, in plain loops
where it matters, independently of scoutq.foreign's vectorized readers. The integers and scales
come from scoutq's primitives, optionally in act-order: columns permuted so that groups gather
columns from anywhere, with `g_idx` recording each column's group.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scoutq.checkpoint.reader import Checkpoint
from scoutq.quant import primitives
from scoutq.quant.scheme import Scheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class Quantized:
    """Signed integers q [out, in] with scales / zero points [out, groups] and each column's group."""

    q: torch.Tensor  # int8, in the weight's own column order
    scale: torch.Tensor
    zero: torch.Tensor | None  # int8 signed, asymmetric only
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int | None


def quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, act_order_seed: int | None = None,
             per_tensor: bool = False) -> Quantized:
    """RTN in scoutq's convention; with a seed, in a random column order (GPTQ's act-order);
    per_tensor: one symmetric scale from the whole weight's range, repeated on every row."""
    columns = w.shape[1]
    order = torch.arange(columns) if act_order_seed is None else \
        torch.randperm(columns, generator=torch.Generator().manual_seed(act_order_seed))
    permuted = w[:, order]
    if per_tensor:
        whole = permuted.float().reshape(1, -1)
        one, _ = primitives.compute_qparams(whole, Scheme(scheme.bits, None, True), scale_dtype)
        scale, zero = one.expand(w.shape[0], 1).contiguous(), None
    else:
        scale, zero = primitives.compute_qparams(permuted, scheme, scale_dtype)
    q_permuted = primitives.quantize(permuted, scale, zero, scheme)
    q = torch.empty_like(q_permuted)
    q[:, order] = q_permuted
    size = scheme.group_size or columns
    g_idx = torch.empty(columns, dtype=torch.int32)
    g_idx[order] = (torch.arange(columns) // size).to(torch.int32)
    return Quantized(q, scale, zero, g_idx, scheme.bits, scheme.group_size)


def _pack_fields(values: list[int], bits: int) -> int:
    """One int32 word from 32/b unsigned fields, the first in the lowest bits (as a signed int)."""
    word = 0
    for k, value in enumerate(values):
        word |= (value & ((1 << bits) - 1)) << (bits * k)
    return word - (1 << 32) if word >= 1 << 31 else word


def gptq_tensors(quantized: Quantized, v1: bool) -> dict[str, torch.Tensor]:
    """qweight [in b/32, out] (packed along the input), qzeros [groups, out b/32], scales fp16, g_idx."""
    bits, per = quantized.bits, 32 // quantized.bits
    offset = 1 << (bits - 1)
    unsigned = (quantized.q.to(torch.int32) + offset).t().tolist()  # [in][out]
    out_features = quantized.q.shape[0]
    groups = quantized.scale.shape[1]
    zeros = [[offset] * out_features for _ in range(groups)] if quantized.zero is None else \
        (quantized.zero.to(torch.int32) + offset).t().tolist()
    if v1:  # GPTQ v1 stores zero - 1 in every field
        zeros = [[z - 1 for z in row] for row in zeros]
    qweight = [[_pack_fields([unsigned[r * per + k][o] for k in range(per)], bits) for o in range(out_features)]
               for r in range(len(unsigned) // per)]
    qzeros = [[_pack_fields(row[c * per:(c + 1) * per], bits) for c in range(out_features // per)] for row in zeros]
    return {"qweight": torch.tensor(qweight, dtype=torch.int32), "qzeros": torch.tensor(qzeros, dtype=torch.int32),
            "scales": quantized.scale.t().to(torch.float16).contiguous(), "g_idx": quantized.g_idx.clone()}


def awq_tensors(quantized: Quantized) -> dict[str, torch.Tensor]:
    """qweight [in, out/8] and qzeros [groups, out/8] packed along the output in AWQ's order; scales fp16."""
    assert quantized.bits == 4 and quantized.zero is not None
    unsigned = (quantized.q.to(torch.int32) + 8).t().tolist()  # [in][out]
    zeros = (quantized.zero.to(torch.int32) + 8).t().tolist()  # [groups][out]

    def pack(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[_pack_fields([row[8 * c + AWQ_ORDER[k]] for k in range(8)], 4)
                              for c in range(len(row) // 8)] for row in rows], dtype=torch.int32)

    return {"qweight": pack(unsigned), "qzeros": pack(zeros), "scales": quantized.scale.t().to(torch.float16).contiguous()}


def ct_pack_tensors(quantized: Quantized, with_g_idx: bool) -> dict[str, torch.Tensor]:
    scheme = Scheme(quantized.bits, quantized.group_size, quantized.zero is None)
    tensors = {"weight_packed": primitives.pack_int32(quantized.q, quantized.bits), "weight_scale": quantized.scale,
               "weight_shape": torch.tensor(list(quantized.q.shape), dtype=torch.int64)}
    if quantized.zero is not None:
        tensors["weight_zero_point"] = primitives.pack_zero_point(quantized.zero, scheme.bits)
    if with_g_idx:
        tensors["weight_g_idx"] = quantized.g_idx.clone()
    return tensors


def ct_naive_tensors(quantized: Quantized, per_tensor: bool = False) -> dict[str, torch.Tensor]:
    tensors = {"weight": quantized.q.clone(), "weight_scale": quantized.scale[:1, :1].reshape(1).clone()
               if per_tensor else quantized.scale.clone()}
    if quantized.zero is not None:
        tensors["weight_zero_point"] = quantized.zero.clone()
    return tensors


def quantized_linears(checkpoint: Checkpoint) -> list[str]:
    """Every decoder Linear a weight-only tool quantizes (attention, experts, shared expert,
    dense MLP), routed experts as per-expert modules; the router, lm_head and embeddings are kept."""
    config, layout = checkpoint.config, checkpoint.layout
    names = []
    for i in range(config.num_hidden_layers):
        names += [layout.layer_key(i, f"self_attn.{p}_proj") for p in "qkvo"]
        if config.is_moe_layer(i):
            names += [layout.layer_key(i, f"feed_forward.shared_expert.{p}_proj") for p in ("gate", "up", "down")]
            names += [layout.layer_key(i, f"feed_forward.experts.{e}.{p}_proj")
                      for e in range(config.num_local_experts) for p in ("gate", "up", "down")]
        else:
            names += [layout.layer_key(i, f"feed_forward.{p}_proj") for p in ("gate", "up", "down")]
    return names


def dense_linears(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Module name -> its source weight [out, in], routed experts split out of the fused tensors."""
    weights = {}
    for name in quantized_linears(checkpoint):
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            layer = int(parts[parts.index("layers") + 1])
            expert = int(parts[parts.index("experts") + 1])
            gate, up, down = checkpoint.read_expert(layer, expert)
            weights[name] = {"gate_proj": gate, "up_proj": up, "down_proj": down}[parts[-1]]
        else:
            weights[name] = checkpoint.read(f"{name}.weight")
    return weights


def write_foreign(source: Path, out: Path, qconfig: dict[str, Any],
                  module_tensors: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> Path:
    """A copy of `source` whose decoder Linears are stored by `module_tensors(name, weight)` (suffix ->
    tensor), routed experts per expert, with `qconfig` as config.json's quantization_config."""
    checkpoint = Checkpoint.open(source)
    layout = checkpoint.layout
    fused = {layout.gate_up_key(i) for i in range(checkpoint.config.num_hidden_layers)} | \
            {layout.down_key(i) for i in range(checkpoint.config.num_hidden_layers)}
    linears = dense_linears(checkpoint)
    tensors: dict[str, torch.Tensor] = {}
    for key in checkpoint.tensors:
        if key in fused or key.removesuffix(".weight") in linears:
            continue
        tensors[key] = checkpoint.read(key)
    for name, weight in linears.items():
        for suffix, tensor in module_tensors(name, weight).items():
            tensors[f"{name}.{suffix}"] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = qconfig
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in source.iterdir():
        if extra.name.startswith("tokenizer") or extra.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(extra, out / extra.name)
    return out
