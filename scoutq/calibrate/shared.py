"""The calibration client across ranks: each module group of a layer is quantized by one owner.

The ranks hold different calibration windows (stream/processes.py, `Ranks.share`). At the start
of a layer every rank computes the same owner table: `Ranks.owners` over the GPTQ cost of each
group of modules that share an input (q/k/v, o, the shared expert or a dense layer's MLP, every
routed expert), from the shapes alone. At each group the stream reaches:

    owner    gathers the group's input rows from every rank in rank order, which is window order:
             exactly the tensor a single process holds; runs the single-process client on it
             (statistics, GPTQ or clipping); broadcasts the packed weights
    others   send their rows and receive the packed weights
    every    rank computes on with the same dequantized weights, each on its own windows

Routed experts are independent of each other: before the first one, every rank gathers the MoE
block's input and router logits of all windows, and each owner quantizes its experts ahead, in
parallel with the other owners; as the stream reaches expert e, its owner broadcasts it.

Why the bytes do not depend on the number of ranks: the statistics of a module (X^T X, paired
X^T X_r) are summed on one rank, over the same rows in the same order as in one process, never
as partial sums reduced across ranks (float addition is not associative, so partial sums would
change with the split); the hidden states are computed window by window (stream/hooks.Windows);
and results travel as stored tensors, bit for bit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from scoutq.calibrate.quantizer import CalibratingClient, CalibrationSettings, ExpertCoverage
from scoutq.checkpoint.config import TextConfig
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import QuantPlan
from scoutq.stream.hooks import ExpertInput, ModuleInput, MoeInputs, ProgressFn, Weights, Windows
from scoutq.stream.processes import Ranks, note_work
from scoutq.stream.walk import Hidden, LayerStream

FAULT_IN_LAYER_ENV = "SCOUTQ_FAULT_IN_LAYER"  # tests: SIGKILL rank SCOUTQ_FAULT_RANK before this layer's experts
FAULT_RANK_ENV = "SCOUTQ_FAULT_RANK"
Packed = dict[str, PackedWeight]
ExpertResult = tuple[Packed, ExpertCoverage]


def _gptq_cost(shapes: list[tuple[int, int]]) -> float:
    """GPTQ's work on weights [out, in] sharing one input: one factorisation of the [in, in]
    Hessian, then out x in^2 for the column sweep of each weight."""
    columns = shapes[0][1]
    return float(columns**3 + sum(rows * columns**2 for rows, _ in shapes))


def layer_groups(config: TextConfig, names: Callable[[str], str], layer: int) -> list[tuple[str, float]]:
    """(first module name, cost) of each group of modules in layer `layer` that share an input."""
    width, attention = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    def swiglu(module: str, hidden: int) -> list[tuple[str, float]]:
        return [(names(f"{module}.gate_proj"), _gptq_cost([(hidden, width)] * 2) + _gptq_cost([(width, hidden)]))]

    groups = [(names("self_attn.q_proj"), _gptq_cost([(attention, width), (kv, width), (kv, width)])),
              (names("self_attn.o_proj"), _gptq_cost([(width, attention)]))]
    if not config.is_moe_layer(layer):
        return groups + swiglu("feed_forward", config.intermediate_size_mlp)
    groups += swiglu("feed_forward.shared_expert", config.intermediate_size)
    for expert in range(config.num_local_experts):
        groups += swiglu(f"feed_forward.experts.{expert}", config.intermediate_size)
    return groups


def _on_cpu(value: torch.Tensor | None) -> torch.Tensor | None:
    """Collectives pickle their objects; a pickled GPU tensor would land on the sender's device."""
    return None if value is None else value.cpu()


def _joined(parts: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """Every rank's rows, in rank (window) order, on `device`; None for a stream that is absent."""
    return None if parts[0] is None else torch.cat(parts).to(device)  # type: ignore[arg-type]


def _modules(names: tuple[str, ...]) -> str:
    """`a.q_proj, a.k_proj, a.v_proj` as `a.{q_proj,k_proj,v_proj}`: the tensors a rank holds."""
    prefix = names[0].rpartition(".")[0]
    if len(names) > 1 and all(name.rpartition(".")[0] == prefix for name in names):
        return f"{prefix}.{{{','.join(name.rpartition('.')[2] for name in names)}}}"
    return ", ".join(names)


class ModuleSharingClient(CalibratingClient):
    """CalibratingClient whose module groups are quantized by their owner rank; see the module docstring."""

    def __init__(self, stream: LayerStream, plan: QuantPlan, settings: CalibrationSettings, ranks: Ranks,
                 on_progress: ProgressFn | None = None):
        super().__init__(stream, plan, settings, on_progress)
        self.ranks = ranks
        self._owner: dict[str, int] = {}  # first module name of a group -> its rank
        self._ahead: dict[int, ExpertResult] = {}
        chosen = os.environ.get(FAULT_RANK_ENV, "0") == str(ranks.index)
        self._fault_layer = int(os.environ.get(FAULT_IN_LAYER_ENV, "-1") or -1) if chosen else -1

    def calibrate_layer(self, index: int, hidden: Hidden) -> tuple[Hidden, Any]:
        groups = layer_groups(self.stream.config, partial(self.stream.layout.layer_key, index), index)
        owners = self.ranks.owners([cost for _, cost in groups])
        self._owner = {name: owner for (name, _), owner in zip(groups, owners, strict=True)}
        return super().calibrate_layer(index, hidden)

    # -- attention, the shared expert, a dense MLP: gathered to their owner -----------------------

    def linears(self, names: tuple[str, ...], weights: Weights, inputs: ModuleInput) -> Weights:
        return self._owned(names, weights, inputs, super().linears)

    def mlp(self, names: tuple[str, str, str], weights: Weights, inputs: ModuleInput) -> Weights:
        return self._owned(names, weights, inputs, super().mlp)  # type: ignore[arg-type]

    def _owned(self, names: tuple[str, ...], weights: Weights, inputs: ModuleInput,
               quantize: Callable[[Any, Weights, ModuleInput], Weights]) -> Weights:
        if not any(self._scheme(name) for name in names):
            return weights  # nothing to quantize: every rank computes with the source weights
        owner = self._owner[names[0]]
        local = (_on_cpu(inputs.x), _on_cpu(inputs.reference), inputs.windows)
        gathered = self.ranks.gather(local, owner)
        packed: Packed | None = None
        if gathered is not None:
            note_work(self.ranks.index, f"quantizing {_modules(names)}")
            device = self.stream.device
            whole = ModuleInput(torch.cat([x for x, _, _ in gathered]).to(device),
                                None if inputs.reference is None else torch.cat([r for _, r, _ in gathered]).to(device),
                                inputs.writes_residual_before, windows=Windows.joined([w for _, _, w in gathered]))
            del gathered
            quantize(names, weights, whole)
            packed = self._take(names)
            note_work(self.ranks.index, f"exchanging the weights of {_modules(names)}")
        return self._use(names, weights, self.ranks.broadcast(packed, owner))

    def _take(self, names: tuple[str, ...]) -> Packed:
        """The packed weights the single-process step left in the layer's result, taken out again."""
        return {name: self.result.quantized.pop(name).to("cpu") for name in names if name in self.result.quantized}

    def _use(self, names: tuple[str, ...], weights: Weights, packed: Packed) -> Weights:
        """Record an owner's packed weights (in the single-process order) and compute with them."""
        packed = {name: weight.to(self.stream.device) for name, weight in packed.items()}
        self.result.quantized.update(packed)
        return tuple(packed[name].reconstructed() if name in packed else weight
                     for name, weight in zip(names, weights, strict=True))

    # -- routed experts: quantized ahead by their owners ------------------------------------------

    def before_experts(self, moe: MoeInputs) -> None:
        self._ahead = {}
        layer = moe.layer
        mine = [expert for expert in range(self.stream.config.num_local_experts)
                if self._owner[self.stream.expert_names(layer, expert)[0]] == self.ranks.index]
        # Every rank takes part in the gather, owner of an expert or not. An expert the recipe keeps
        # is still "quantized" by its owner: its coverage entry counts the tokens of every window.
        parts = self.ranks.all_gather((_on_cpu(moe.x), _on_cpu(moe.logits), _on_cpu(moe.reference),
                                       _on_cpu(moe.reference_logits), moe.windows))
        if not mine:
            return
        x, logits, reference, reference_logits = (_joined([part[i] for part in parts], self.stream.device)
                                                  for i in range(4))
        assert x is not None and logits is not None
        whole = MoeInputs.route(layer, x, Windows.joined([part[4] for part in parts]), logits,
                                self.stream.config.num_experts_per_tok, reference, reference_logits)
        del parts
        for expert in mine:
            self.progress(f"expert {expert} (this rank's)", 2 + expert, 2 + self.stream.config.num_local_experts)
            names = self.stream.expert_names(layer, expert)
            note_work(self.ranks.index, f"quantizing {_modules(names)}")
            if layer == self._fault_layer:  # tests: this rank dies in the middle of a layer
                os.kill(os.getpid(), signal.SIGKILL)
            super().expert(names, self.stream.weights.expert(layer, expert), whole.expert(expert))
            self._ahead[expert] = (self._take(names), self.result.experts.pop())
        note_work(self.ranks.index, f"exchanging layer {layer}'s routed experts")

    def expert(self, names: tuple[str, str, str], weights: Weights, inputs: ExpertInput) -> Weights:
        owner = self._owner[names[0]]
        packed, coverage = self.ranks.broadcast(self._ahead.pop(inputs.expert, None), owner)
        self.result.experts.append(coverage)
        return self._use(names, weights, packed)
