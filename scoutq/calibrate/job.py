"""The calibration phase of a calibrated quantize run: walk every layer, keep its results on disk.

    DST/.scoutq-calibration/
        layer-0007.safetensors   layer 7's quantized modules, under their output tensor names
        hidden.safetensors       the fp32 hidden states entering the next layer to calibrate
                                 (and the reference stream's, with fp_target)
        head.safetensors         lm_head, when the recipe quantizes it
        state.json               run identity, next layer, coverage so far (written last)

Each finished layer is committed in that order, each file under a temporary name then renamed,
so a run killed at any point resumes at the first unfinished layer with exactly the hidden states
it would have had: the output is byte-identical to an uninterrupted run. The shard writer then
takes quantized tensors from these files (calibrated modules) or computes them as usual
(round-to-nearest for quantized modules no calibration data reaches, such as the vision tower).
The directory is removed once the manifest is written.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scoutq.calibrate.quantizer import (
    ALL_EXPERTS,
    ALL_EXPERTS_FALLBACK,
    RTN_FALLBACK,
    CalibratingClient,
    CalibrationSettings,
    LayerResult,
)
from scoutq.calibrate.shared import FAULT_RANK_ENV, ModuleSharingClient
from scoutq.checkpoint.layout import Role
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.writer import atomic_path, atomic_write_json, read_json_state
from scoutq.data.sets import CalibrationBatch
from scoutq.errors import ScoutqError
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import QuantPlan
from scoutq.quant.recipe import Method
from scoutq.stream.hooks import ProgressFn
from scoutq.stream.processes import Ranks
from scoutq.stream.walk import Hidden, LayerStream

CALIBRATION_DIR = ".scoutq-calibration"
COVERAGE_NAME = "coverage.json"
FAULT_ENV = "SCOUTQ_FAULT_AFTER_LAYERS"  # tests: SIGKILL this process after N layers are committed
SINGLE = Ranks()
UNCALIBRATED_ROLES = frozenset({Role.VISION, Role.PROJECTOR})  # no text hidden states reach them

LayerProgressFn = Callable[[int, int], None]  # (layer being calibrated, layers in the model)


@dataclass(frozen=True)
class CalibrationRun:
    """What a calibrated run needs beyond the plan: its tokens and algorithm settings."""

    batch: CalibrationBatch
    settings: CalibrationSettings

    def identity(self) -> dict[str, Any]:
        """Everything about the calibration that changes output bytes (the recipe is hashed apart)."""
        batch = self.batch
        return {"set": batch.set_name, "tokens_sha256": batch.fingerprint, "samples": batch.samples,
                "seq_len": batch.seq_len, "seed": batch.seed}


def check_ranks(run: CalibrationRun, ranks: Ranks) -> None:
    """Each process carries whole windows: a run needs at least as many as it has ranks."""
    if run.batch.samples < ranks.count:
        raise ScoutqError(f"{ranks.count} processes need at least {ranks.count} calibration windows "
                          f"(--samples {run.batch.samples}): each process carries whole windows")


class CalibratedTensors:
    """Quantized tensors of calibrated modules, read back from the calibration directory."""

    def __init__(self, directory: Path, files: dict[str, Path]):
        self.directory = directory
        self.files = files  # module name -> file holding its tensors

    def has(self, module: str) -> bool:
        return module in self.files

    def tensors(self, module: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(self.files[module]), framework="pt", device="cpu") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as partial:
        save_file(tensors, str(partial))


def _packed_state(quantized: dict[str, PackedWeight]) -> dict[str, torch.Tensor]:
    return {f"{name}.{suffix}": tensor.cpu().contiguous() for name, packed in quantized.items()
            for suffix, tensor in packed.state().items()}


def _hidden_state(hidden: Hidden) -> dict[str, torch.Tensor]:
    state = {"hidden": hidden.main.cpu().contiguous()}
    if hidden.reference is not None:
        state["reference"] = hidden.reference.cpu().contiguous()
    return state


def _load_hidden(directory: Path, windows: range, device: torch.device) -> Hidden:
    """This rank's windows of the committed hidden states (any rank count can resume a run)."""
    with safe_open(str(directory / "hidden.safetensors"), framework="pt", device="cpu") as handle:
        def read(name: str) -> torch.Tensor:
            return handle.get_slice(name)[windows.start : windows.stop].to(device)

        names = handle.keys()  # a safetensors handle, not a dict
        return Hidden(read("hidden"), read("reference") if "reference" in names else None)


def _gathered_hidden(hidden: Hidden, ranks: Ranks) -> Hidden | None:
    """Every rank's windows of `hidden`, in window order, on rank 0 (None on the others)."""
    if ranks.count == 1:
        return hidden
    parts = ranks.gather((hidden.main.cpu(), None if hidden.reference is None else hidden.reference.cpu()), owner=0)
    if parts is None:
        return None
    reference = None if hidden.reference is None else torch.cat([r for _, r in parts])
    return Hidden(torch.cat([m for m, _ in parts]), reference)


def _layer_file(directory: Path, layer: int) -> Path:
    return directory / f"layer-{layer:04d}.safetensors"


def _coverage_entry(result: LayerResult) -> dict[str, Any]:
    return {"layer": result.layer, "tokens": result.tokens, "experts": [asdict(e) for e in result.experts]}


def run_calibration(
    checkpoint: Checkpoint,
    plan: QuantPlan,
    run: CalibrationRun,
    directory: Path,
    identity: str,
    on_layer: LayerProgressFn | None = None,
    on_step: ProgressFn | None = None,
    ranks: Ranks = SINGLE,
    device: torch.device | str = "cpu",
) -> tuple[CalibratedTensors, dict[str, Any]]:
    """Calibrate and quantize every text layer (resuming a matching earlier run in `directory`).

    With several ranks (stream/processes.py) each rank walks its share of the calibration windows
    and the modules of each layer are quantized by their owner ranks (calibrate/shared.py); rank 0
    alone writes the calibration directory (gathering the hidden states) and tells the others
    where to start. Returns the calibrated tensors and the coverage document
    (coverage.json's content). The arithmetic runs on `device`; files are written from the CPU.
    """
    check_ranks(run, ranks)
    state = None
    if ranks.writer:
        state = read_json_state(directory / "state.json", identity)
        if state is None:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            state = {"identity": identity, "next_layer": 0, "layers": [], "head": False}
    state = ranks.broadcast(state, owner=0)

    device = torch.device(device)
    stream = LayerStream(checkpoint, device=device)
    client = (CalibratingClient(stream, plan, run.settings, on_step) if ranks.count == 1
              else ModuleSharingClient(stream, plan, run.settings, ranks, on_step))
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0) if ranks.index == int(os.environ.get(FAULT_RANK_ENV, "0")) \
        else 0
    with torch.device(device):  # the quantization math's own tensors (GPTQ's scratch) on the device too
        _walk(stream, client, run, directory, state, ranks, fault_after, on_layer)

    files: dict[str, Path] = {}
    for item in plan.quantized():
        module = item.module
        if module.layer is not None and module.role not in UNCALIBRATED_ROLES:
            files[module.name] = _layer_file(directory, module.layer)
        elif module.role == Role.LM_HEAD:
            files[module.name] = directory / "head.safetensors"
    return CalibratedTensors(directory, files), coverage_document(plan, run, state["layers"])


def _walk(stream: LayerStream, client: CalibratingClient, run: CalibrationRun, directory: Path,
          state: dict[str, Any], ranks: Ranks, fault_after: int, on_layer: LayerProgressFn | None) -> None:
    """The layers not yet committed, then lm_head; rank 0 commits each as it finishes."""
    layers = stream.config.num_hidden_layers
    if state["next_layer"] >= layers and state["head"]:
        return
    windows = ranks.share(run.batch.samples)
    hidden = (stream.start(run.batch.tokens[windows.start : windows.stop]) if state["next_layer"] == 0
              else _load_hidden(directory, windows, stream.device))
    whole: Hidden | None = None
    for layer in range(state["next_layer"], layers):
        if on_layer:
            on_layer(layer, layers)
        hidden, result = client.calibrate_layer(layer, hidden)
        result.tokens = run.batch.tokens.numel()  # every rank's windows
        state["layers"].append(_coverage_entry(result))
        state["next_layer"] = layer + 1
        whole = _gathered_hidden(hidden, ranks)
        if whole is not None:
            _save_atomic(_packed_state(result.quantized), _layer_file(directory, layer))
            _save_atomic(_hidden_state(whole), directory / "hidden.safetensors")
            atomic_write_json(directory / "state.json", state)  # the commit point of this layer
        if fault_after and layer + 1 >= fault_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if ranks.writer:  # lm_head needs no other rank: the others are done
        if whole is None:  # every layer was committed before: the final hidden states are on disk
            whole = _load_hidden(directory, range(run.batch.samples), stream.device)
        head = client.head(whole.main.to(stream.device))
        if head:
            _save_atomic(_packed_state(head), directory / "head.safetensors")
        state["head"] = True
        atomic_write_json(directory / "state.json", state)


def coverage_document(plan: QuantPlan, run: CalibrationRun, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """coverage.json: per layer and expert, tokens routed and seen, and the policy applied."""
    settings = run.settings
    below = [
        {"layer": entry["layer"], "expert": e["expert"], "routed_tokens": e["routed_tokens"], "policy": e["policy"]}
        for entry in layers for e in entry["experts"]
        if e["policy"] in (ALL_EXPERTS_FALLBACK, RTN_FALLBACK)
    ]
    uncalibrated = [item.module.name for item in plan.quantized() if item.module.role in UNCALIBRATED_ROLES]
    return {
        "format": "scoutq-coverage/1",
        "calibration": run.identity(),
        "settings": {
            "method": settings.method.value,
            "all_experts": settings.all_experts,
            "min_tokens": settings.min_tokens,
            "fallback": settings.fallback.value,
            "fp_target": settings.paired,
            "router_weight": settings.gptq.router_weight if settings.method == Method.GPTQ else 0.0,
        },
        "layers": layers,
        "below_min_tokens": below,
        "all_experts_statistics": settings.all_experts,
        "round_to_nearest_modules": uncalibrated,  # quantized without calibration: no data reaches them
        "policies": {
            "routed": "statistics from the tokens the router sent to this expert, scaled by their router scores",
            ALL_EXPERTS: "statistics from every token, scaled by this expert's own router score (all_experts)",
            ALL_EXPERTS_FALLBACK: "fewer routed tokens than min_tokens: statistics from every token, as all_experts",
            RTN_FALLBACK: "fewer routed tokens than min_tokens: round-to-nearest, no statistics",
            "not_quantized": "the recipe keeps these experts in source precision",
        },
    }
