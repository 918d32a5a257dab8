"""Where the quantization error sits: per MoE layer and expert, in the weights and in the outputs.

* weight SQNR: 10 log10(||W||^2 / ||W - deq(Q)||^2) over an expert's three projections, the
  dequantized weights exactly as stored (compressed-tensors arithmetic) against the source.
* output SQNR: the same ratio for the expert's *outputs* on the evaluation tokens the
  reference routes to it, each input scaled by its router score as the model does. A weight
  error along directions the data never excites costs nothing; this measures what it costs.

Both are in dB (higher is better; int4 g128 is around 20 dB, int8 around 45 dB). An expert no
evaluation token reaches gets NaN output SQNR. The shared expert gets one entry per layer.
The inputs are the reference's own: this module is a client of the layer stream walking the
reference checkpoint (one layer and one expert resident, so it works for models larger than
memory), over the first `max_windows` windows only: enough tokens for a stable ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ScoutqError
from scoutq.model.moe import swiglu_intermediate
from scoutq.stream.hooks import ExpertInput, ModuleInput, StreamClient, Weights
from scoutq.stream.walk import LayerStream
from scoutq.stream.weights import DenseWeights

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


def _weight_sqnr(source: Weights, candidate: Weights) -> float:
    return sqnr_db(sum(float(w.square().sum()) for w in source),
                   sum(float((w - q).square().sum()) for w, q in zip(source, candidate, strict=True)))


def _output_sqnr(x: torch.Tensor, source: Weights, candidate: Weights) -> float:
    y_ref, y_q = _swiglu(x, *source), _swiglu(x, *candidate)
    return sqnr_db(float(y_ref.square().sum()), float((y_ref - y_q).square().sum()))


class ExpertErrors(StreamClient):
    """Walks the reference with its own weights; at each expert and shared expert, compares the
    candidate's weights and outputs on the inputs the reference gives that expert."""

    def __init__(self, candidate: DenseWeights, tables: ErrorTables):
        self.candidate = candidate
        self.tables = tables

    def routing(self, layer: int, experts: torch.Tensor) -> None:
        self.tables.layers.append(layer)
        for row in (self.tables.weight_sqnr_db, self.tables.output_sqnr_db, self.tables.tokens):
            row.append([])

    def mlp(self, names: tuple[str, str, str], weights: Weights, inputs: ModuleInput) -> Weights:
        if ".shared_expert." in names[0]:  # the MoE layers' shared expert, not a dense layer's MLP
            candidate = tuple(self.candidate.linear(name) for name in names)
            self.tables.shared_weight_sqnr_db.append(_weight_sqnr(weights, candidate))
            self.tables.shared_output_sqnr_db.append(_output_sqnr(inputs.x, weights, candidate))
        return weights

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        candidate = self.candidate.expert(inputs.layer, inputs.expert)
        routed = inputs.x  # score-scaled, as the model multiplies them
        self.tables.weight_sqnr_db[-1].append(_weight_sqnr(weights, candidate))
        self.tables.tokens[-1].append(int(routed.shape[0]))
        self.tables.output_sqnr_db[-1].append(_output_sqnr(routed, weights, candidate) if routed.shape[0] else math.nan)
        return weights


def error_tables(candidate_dir: Path, reference_dir: Path, windows: torch.Tensor, max_windows: int = 8,
                 device: torch.device | str = "cpu") -> ErrorTables:
    """Weight and output SQNR of every routed expert (and shared expert) of every MoE layer."""
    candidate, source = Checkpoint.open(candidate_dir), Checkpoint.open(reference_dir)
    if candidate.config.num_local_experts != source.config.num_local_experts:
        raise ScoutqError(f"{candidate_dir} and {reference_dir} have different numbers of experts")
    tables = ErrorTables([], [], [])
    stream = LayerStream(source, ExpertErrors(DenseWeights(candidate, device), tables), device)
    hidden = stream.start(windows[:max_windows])
    with torch.inference_mode():
        for layer in range(source.config.num_hidden_layers):
            hidden = stream.layer(layer, hidden)
    return tables
