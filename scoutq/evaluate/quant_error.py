"""Where the quantization error sits: per MoE layer and expert, in the weights and in the outputs.

* weight SQNR: 10 log10(||W||^2 / ||W - deq(Q)||^2) over an expert's three projections, the
  dequantized weights exactly as stored (compressed-tensors arithmetic) against the source.
* output SQNR: the same ratio for the expert's *outputs* on the evaluation tokens the
  reference routes to it, each input scaled by its router score as the model does. A weight
  error along directions the data never excites costs nothing; this measures what it costs.

Both are in dB (higher is better; int4 g128 is around 20 dB, int8 around 45 dB). An expert no
evaluation token reaches gets NaN output SQNR. The shared expert gets one entry per layer.
Inputs are captured from the resident reference model with forward hooks on each MoE block,
on the first `max_windows` windows only: enough tokens for a stable ratio, bounded memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scoutq.calibrate.weights import DenseWeights
from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ScoutqError
from scoutq.model.moe import MoE, swiglu_intermediate

PROJECTIONS = ("gate", "up", "down")


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    if signal_energy == 0 and noise_energy == 0:
        return math.nan
    if noise_energy == 0:
        return math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


@dataclass
class ErrorTables:
    """Rows are MoE layers (`layers`), columns experts; NaN where nothing was measured."""

    layers: list[int]
    weight_sqnr_db: list[list[float]]
    output_sqnr_db: list[list[float]]
    shared_weight_sqnr_db: list[float] = field(default_factory=list)
    shared_output_sqnr_db: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # evaluation tokens routed to each expert


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return swiglu_intermediate(x, gate, up) @ down.t()


def _capture_moe_inputs(reference: torch.nn.Module, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each MoE block's input [tokens, D] (fp32) when the reference runs the windows."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(reference.layers):  # type: ignore[union-attr]
        if isinstance(layer.feed_forward, MoE):
            def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], index: int = index) -> None:
                captured.setdefault(index, []).append(inputs[0].detach().float())
            handles.append(layer.feed_forward.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], 4):
                reference(windows[start : start + 4])
    finally:
        for handle in handles:
            handle.remove()
    return {index: torch.cat(parts) for index, parts in captured.items()}


def error_tables(candidate_dir: Path, reference_dir: Path, reference: torch.nn.Module, windows: torch.Tensor,
                 max_windows: int = 8) -> ErrorTables:
    """Weight and output SQNR of every routed expert (and shared expert) of every MoE layer."""
    candidate, source = DenseWeights(Checkpoint.open(candidate_dir)), DenseWeights(Checkpoint.open(reference_dir))
    config = source.checkpoint.config
    if candidate.checkpoint.config.num_local_experts != config.num_local_experts:
        raise ScoutqError(f"{candidate_dir} and {reference_dir} have different numbers of experts")
    inputs = _capture_moe_inputs(reference, windows[:max_windows])
    layout = source.checkpoint.layout
    tables = ErrorTables(sorted(inputs), [], [])
    for layer in tables.layers:
        x = inputs[layer]
        moe = reference.layers[layer].feed_forward  # type: ignore[index, union-attr]
        with torch.inference_mode():
            logits = moe.router(x.to(moe.router.weight.dtype)).float()
        top_logits, chosen = torch.topk(logits, config.num_experts_per_tok, dim=-1)
        scores = torch.sigmoid(top_logits)
        weight_row, output_row, token_row = [], [], []
        for expert in range(config.num_local_experts):
            ref_w, cand_w = list(source.expert(layer, expert)), list(candidate.expert(layer, expert))
            weight_row.append(sqnr_db(sum(float(w.square().sum()) for w in ref_w),
                                      sum(float((w - q).square().sum()) for w, q in zip(ref_w, cand_w, strict=True))))
            token, slot = torch.nonzero(chosen == expert, as_tuple=True)
            routed = x[token] * scores[token, slot, None]
            token_row.append(int(token.numel()))
            if token.numel() == 0:
                output_row.append(math.nan)
                continue
            y_ref, y_q = _swiglu(routed, *ref_w), _swiglu(routed, *cand_w)
            output_row.append(sqnr_db(float(y_ref.square().sum()), float((y_ref - y_q).square().sum())))
        tables.weight_sqnr_db.append(weight_row)
        tables.output_sqnr_db.append(output_row)
        tables.tokens.append(token_row)

        shared = [layout.layer_key(layer, f"feed_forward.shared_expert.{p}_proj") for p in PROJECTIONS]
        ref_s, cand_s = [source.linear(m) for m in shared], [candidate.linear(m) for m in shared]
        tables.shared_weight_sqnr_db.append(sqnr_db(sum(float(w.square().sum()) for w in ref_s),
                                                    sum(float((w - q).square().sum()) for w, q in zip(ref_s, cand_s, strict=True))))
        y_ref, y_q = _swiglu(x, *ref_s), _swiglu(x, *cand_s)
        tables.shared_output_sqnr_db.append(sqnr_db(float(y_ref.square().sum()), float((y_ref - y_q).square().sum())))
    return tables
