"""The calibration client across ranks: a layer's routed experts are split between the processes.

Every rank walks the same tokens through the same layers, so each has the inputs of every
expert. Before the first expert of a MoE layer, each rank quantizes the experts it owns
(`Ranks.owners`, balanced by a cost every rank computes alike) with exactly the single-process
code; then, as the stream reaches expert e, the owner broadcasts e's packed weights and coverage
entry and every rank computes on with the same dequantized weights. Attention and the shared
expert are quantized by every rank alike (they are sequential steps, and each is one module's
work): identical inputs and arithmetic give identical bits on every rank.

No float is summed across ranks: each module's statistics come from all its tokens on one rank,
as in a single process, and results travel as stored tensors. The output is therefore
byte-identical to a single-process run for any number of ranks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import torch

from scoutq.calibrate.quantizer import CalibratingClient, CalibrationSettings, ExpertCoverage
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import QuantPlan
from scoutq.stream.hooks import ExpertInput, ProgressFn, Weights
from scoutq.stream.processes import Ranks
from scoutq.stream.walk import LayerStream

FAULT_IN_LAYER_ENV = "SCOUTQ_FAULT_IN_LAYER"  # tests: SIGKILL rank SCOUTQ_FAULT_RANK before this layer's experts
FAULT_RANK_ENV = "SCOUTQ_FAULT_RANK"
ExpertResult = tuple[dict[str, PackedWeight], ExpertCoverage]


class ExpertSharingClient(CalibratingClient):
    """CalibratingClient whose routed experts are quantized by their owner rank; see the module docstring."""

    def __init__(self, stream: LayerStream, plan: QuantPlan, settings: CalibrationSettings, ranks: Ranks,
                 on_progress: ProgressFn | None = None):
        super().__init__(stream, plan, settings, on_progress)
        self.ranks = ranks
        self._routed: list[int] = []
        self._owners: list[int] = []
        self._ahead: dict[int, ExpertResult] = {}
        chosen = os.environ.get(FAULT_RANK_ENV, "0") == str(ranks.index)
        self._fault_layer = int(os.environ.get(FAULT_IN_LAYER_ENV, "-1") or -1) if chosen else -1

    def routing(self, layer: int, experts: torch.Tensor) -> None:
        self._routed = torch.bincount(experts.reshape(-1), minlength=self.stream.config.num_local_experts).tolist()

    def before_experts(self, layer: int, expert_input: Callable[[int], ExpertInput]) -> None:
        # GPTQ's cost is the same for every expert (same shapes); the statistics add a term per token.
        total = max(sum(self._routed), 1)
        self._owners = self.ranks.owners([1.0 + routed / total for routed in self._routed])
        self._ahead = {}
        if layer == self._fault_layer:  # tests: this rank dies in the middle of a layer
            os.kill(os.getpid(), signal.SIGKILL)
        for expert, owner in enumerate(self._owners):
            if owner == self.ranks.index:
                self.progress(f"expert {expert} (this rank's)", 2 + expert, 2 + len(self._owners))
                names = self.stream.expert_names(layer, expert)
                self._ahead[expert] = self._quantize_apart(names, self.stream.weights.expert(layer, expert),
                                                           expert_input(expert))

    def _quantize_apart(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> ExpertResult:
        """The single-process expert step, its results taken out of the layer's result again."""
        super().expert(names, weights, inputs)
        # Sent through the CPU: a pickled GPU tensor would land on the sender's device index.
        packed = {name: self.result.quantized.pop(name).to("cpu") for name in names if name in self.result.quantized}
        return packed, self.result.experts.pop()

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        packed, coverage = self.ranks.broadcast(self._ahead.pop(inputs.expert, None), self._owners[inputs.expert])
        packed = {name: weight.to(self.stream.device) for name, weight in packed.items()}
        self.result.experts.append(coverage)
        self.result.quantized.update(packed)  # gate, up, down: the single-process order
        return tuple(packed[name].dequantize().float() if name in packed else weight
                     for name, weight in zip(names, weights, strict=True))
