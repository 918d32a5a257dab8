"""Streaming quantization: read, quantize and write a checkpoint one expert or tensor at a time.

    source shards ──pread──▶ work unit (expert e's gate+up, expert e's down, one tensor)
                   ──quantize (worker threads)──▶ ordered outputs ──▶ shard writer ──▶ rename

* The plan fixes every output tensor and shard up front; work units run on a small thread
  pool (torch releases the GIL) while the main thread writes, so reading, quantizing and
  writing overlap. At most `workers + 1` finished units wait in memory.
* Tensors above STREAMED_BYTES (embeddings, lm_head) never sit in memory whole: they are
  read, checked and (if the recipe says) quantized in row blocks as they are written.
* Each shard is written under a hidden `.partial` name (checkpoint.writer.atomic_path),
  fsynced, recorded with its sha256 in a journal, then renamed. A rerun of the same command
  finds the journal, re-checks the finished shards' hashes and writes only the rest.
  config.json, the index, the copied tokenizer files and finally the manifest are written
  last; the manifest marks completion.
* A calibrated recipe (gptq, clip) first runs the layer walk of scoutq.calibrate, which keeps
  each layer's quantized modules in DST/.scoutq-calibration (resumable per layer); the shard
  writer then copies those instead of rounding to nearest. coverage.json joins the output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import torch

from scoutq.calibrate.estimate import RUNTIME_BASE_BYTES
from scoutq.calibrate.job import (
    CALIBRATION_DIR,
    COVERAGE_NAME,
    CalibratedTensors,
    CalibrationRun,
    LayerProgressFn,
    check_ranks,
    run_calibration,
)
from scoutq.checkpoint.hashing import file_sha256
from scoutq.checkpoint.manifest import (
    MANIFEST_NAME,
    library_versions,
    read_manifest,
    source_fingerprint,
    write_manifest,
)
from scoutq.checkpoint.reader import INDEX_NAME, Checkpoint
from scoutq.checkpoint.rows import read_rows
from scoutq.checkpoint.safetensors_io import StreamingWriter, TensorInfo
from scoutq.checkpoint.writer import atomic_path, atomic_write_json, plan_shards, read_json_state, shard_name
from scoutq.errors import ScoutqError, one_line
from scoutq.pipeline.ct_config import quantization_config
from scoutq.quant import rtn
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import PlannedModule, QuantPlan
from scoutq.quant.rtn import rtn_quantize, rtn_quantize_input_major
from scoutq.stream.hooks import ProgressFn
from scoutq.stream.processes import Ranks

JOURNAL_NAME = ".scoutq-journal.json"
COMPILE_ABOVE_BYTES = 2 * 10**9  # compiling the kernels (~10-30 s once) pays off above this
STREAMED_BYTES = 256 * 1024 * 1024  # tensors above this are processed in row blocks while writing
BLOCK_BYTES = 32 * 1024 * 1024  # row-block size for streamed tensors
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
FAULT_ENV = "SCOUTQ_FAULT_AFTER_BYTES"  # tests: SIGKILL this process after N bytes of shard data
FAULT_POINT_ENV = "SCOUTQ_FAULT_POINT"  # tests: SIGKILL at a named step (before-rename, before-manifest, ...)


def fault_point(name: str) -> None:
    """Die here, as a power cut or the OOM killer would, when the tests ask for this step."""
    if os.environ.get(FAULT_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Unit:
    """Modules computed together: both halves of one expert's gate_up slice share one read."""

    modules: list[PlannedModule]

    @property
    def outputs(self) -> list[str]:
        return [spec.name for item in self.modules for spec in item.outputs]

    @property
    def bytes_in(self) -> int:
        return sum(item.bytes_in for item in self.modules)

    @property
    def streamed(self) -> bool:
        return self.modules[0].module.expert is None and self.bytes_in > STREAMED_BYTES

SINGLE = Ranks()


@dataclass
class QuantizeReport:
    destination: str
    identity: str
    shards: int
    shards_reused: int
    bytes_in: int
    bytes_out: int
    seconds: float
    already_complete: bool = False
    warnings: list[str] = field(default_factory=list)
    coverage: dict[str, Any] | None = None


def work_units(plan: QuantPlan) -> list[Unit]:
    units: list[Unit] = []
    for item in plan.items:
        module = item.module
        last = units[-1].modules[-1].module if units else None
        if (module.proj == "up" and last is not None and last.proj == "gate"
                and (last.layer, last.expert, last.source) == (module.layer, module.expert, module.source)):
            units[-1].modules.append(item)
        else:
            units.append(Unit([item]))
    return units


def _where(info: TensorInfo, expert: int | None = None) -> str:
    return f"{info.file}: tensor {info.name!r}" + (f" (expert {expert})" if expert is not None else "")


def _check_finite(values: torch.Tensor, what: str) -> None:
    """NaN and Inf propagate through min/max; one aminmax pass reads bf16 without a copy."""
    if values.is_floating_point() and values.numel():
        low, high = torch.aminmax(values)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise ScoutqError(f"{what} contains NaN or Inf; refusing to quantize it")


def _expert_stored(block: torch.Tensor, item: PlannedModule, width: int) -> torch.Tensor:
    """One projection inside an expert's stored block, as stored: [in, out] (the Linear's transpose)."""
    proj = item.module.proj
    if proj == "gate":
        return block[:, :width]
    if proj == "up":
        return block[:, width:]
    return block


def _packed_outputs(item: PlannedModule, packed: PackedWeight) -> Iterator[tuple[str, torch.Tensor]]:
    for suffix, tensor in packed.state().items():
        yield f"{item.module.name}.{suffix}", tensor


def _produce(checkpoint: Checkpoint, unit: Unit, calibrated: CalibratedTensors | None = None
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """The unit's output tensors, in plan order, as (name, whole tensor or row block)."""
    if calibrated is not None and all(item.scheme is not None and calibrated.has(item.module.name)
                                      for item in unit.modules):
        for item in unit.modules:
            yield from calibrated.tensors(item.module.name, [spec.name for spec in item.outputs])
        return
    first = unit.modules[0].module
    info = checkpoint.info(first.source)
    if first.expert is not None:
        block = read_rows(info, first.expert, first.expert + 1)[0]
        what = _where(info, first.expert)
        for item in unit.modules:
            stored = _expert_stored(block, item, checkpoint.config.intermediate_size)
            if item.scheme is None:
                _check_finite(stored, what)
                yield item.outputs[0].name, stored.t().contiguous()
            else:  # quantized where it lies: no transpose of the bf16 data; the scale check finds NaN
                yield from _packed_outputs(item, rtn_quantize_input_major(stored, item.scheme, what=what))
        return

    item = unit.modules[0]
    rows = info.shape[0] if info.shape else 1
    row_bytes = max(info.nbytes // max(rows, 1), 1)
    step = max(1, BLOCK_BYTES // row_bytes)
    if item.scheme is None:
        if not info.shape:  # a 0-d tensor
            value = checkpoint.read(info.name)
            _check_finite(value, _where(info))
            yield item.outputs[0].name, value
            return
        for start in range(0, rows, step):
            block = read_rows(info, start, min(start + step, rows))
            _check_finite(block, _where(info))
            yield item.outputs[0].name, block
        return
    # Quantized non-expert weight: packed rows go out as they are made; the small scales
    # (1/64 of the weight at int4 g128) wait until the packed tensor is complete.
    scales, zeros = [], []
    scheme = item.scheme
    for start in range(0, rows, step):
        block = read_rows(info, start, min(start + step, rows))
        packed = rtn_quantize(block, scheme, what=_where(info))
        yield f"{item.module.name}.weight_packed", packed.packed
        scales.append(packed.scale)
        if packed.zero_point is not None:
            zeros.append(packed.zero_point)
    whole = PackedWeight(scheme, torch.empty(0, dtype=torch.int32), torch.cat(scales),
                         torch.cat(zeros) if zeros else None, tuple(info.shape))  # type: ignore[arg-type]
    for name, tensor in _packed_outputs(item, whole):
        if not name.endswith(".weight_packed"):
            yield name, tensor


def _ordered_results(
    checkpoint: Checkpoint, units: list[Unit], workers: int, calibrated: CalibratedTensors | None,
    owners: list[int] | None = None, ranks: Ranks = SINGLE,
) -> Iterator[tuple[Unit, Iterator[tuple[str, torch.Tensor]]]]:
    """Each unit's outputs, in order; up to `workers + 1` units computed ahead on the pool. A
    unit another rank owns (`owners`) is received from that rank when its turn comes."""
    owners = owners or [ranks.index] * len(units)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scoutq-quant") as pool:
        window: deque[tuple[Unit, int, Future[list[tuple[str, torch.Tensor]]] | None]] = deque()
        pending = iter(zip(units, owners, strict=True))

        def submit_next() -> None:
            for unit, owner in pending:
                if unit.streamed or owner != ranks.index:  # computed lazily by the writer, or received
                    window.append((unit, owner, None))
                else:
                    window.append((unit, owner, pool.submit(lambda u=unit: list(_produce(checkpoint, u, calibrated)))))
                return

        for _ in range(workers + 1):
            submit_next()
        try:
            while window:
                unit, owner, future = window.popleft()
                submit_next()
                if future is not None:
                    yield unit, iter(_worker_result(future, unit))
                elif owner != ranks.index:
                    yield unit, iter(ranks.receive(owner))
                else:
                    yield unit, _produce(checkpoint, unit, calibrated)
        except BaseException:
            for _, _, future in window:
                if future is not None:
                    future.cancel()
            raise


def _worker_result(future: Future[list[tuple[str, torch.Tensor]]], unit: Unit) -> list[tuple[str, torch.Tensor]]:
    """A worker thread's outputs; if it raised, one line naming the worker and what it held.

    Input and machine faults (ScoutqError, OSError) pass through as they are; anything else is
    a bug, reported on one line with its traceback kept for SCOUTQ_DEBUG=1."""
    try:
        return future.result()
    except (ScoutqError, OSError):
        raise
    except Exception as err:
        held = ", ".join(item.module.name for item in unit.modules)
        raise ScoutqError(f"a quantization worker failed on {held}: {type(err).__name__}: {one_line(err)}; "
                          "the run stopped and nothing was written for it (run the same command to resume; "
                          "SCOUTQ_DEBUG=1 shows the traceback)") from err


def _unit_owners(units: list[Unit], calibrated: CalibratedTensors | None, ranks: Ranks) -> list[int]:
    """The rank that computes each unit: round-to-nearest expert slices and small tensors are
    shared by their bytes (Ranks.owners); rank 0, the writer, keeps the streamed tensors and
    the calibrated modules, which it copies from its own calibration directory."""
    shared = [i for i, unit in enumerate(units) if not unit.streamed
              and not (calibrated is not None and all(calibrated.has(item.module.name) for item in unit.modules))]
    owners = [0] * len(units)
    for i, owner in zip(shared, ranks.owners([units[i].bytes_in for i in shared]), strict=True):
        owners[i] = owner
    return owners


def _send_owned(checkpoint: Checkpoint, units: list[Unit], owners: list[int], workers: int, ranks: Ranks) -> None:
    """A rank other than the writer: compute the units it owns and send each to rank 0, in
    order. A send waits for rank 0 to take it, so at most `workers + 1` units wait in memory."""
    mine = [unit for unit, owner in zip(units, owners, strict=True) if owner == ranks.index]
    for _, outputs in _ordered_results(checkpoint, mine, workers, None, ranks=ranks):
        ranks.send(list(outputs), 0)


def run_identity(checkpoint: Checkpoint, plan: QuantPlan, max_shard_bytes: int) -> dict[str, Any]:
    """Everything that determines the output bytes; its hash keys resume and reuse."""
    return {
        "versions": {k: v for k, v in library_versions().items() if k != "python"},
        "recipe": json.loads(plan.recipe.canonical_json()),
        "source_fingerprint": source_fingerprint(checkpoint),
        "max_shard_bytes": max_shard_bytes,
        "tensors": [[spec.name, spec.dtype, list(spec.shape)] for spec in plan.specs],
    }


def _identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _prepare_on_writer(src: Path, dst: Path, identity: str, overwrite: bool, ranks: Ranks) -> dict[str, str] | None:
    """_prepare_destination on rank 0; the other ranks get its outcome, its error included."""
    outcome: tuple[dict[str, str] | None, str | None] | None = None
    if ranks.writer:
        try:
            outcome = (_prepare_destination(src, dst, identity, overwrite), None)
        except ScoutqError as err:
            if ranks.count == 1:
                raise
            outcome = (None, str(err))
    finished, error = ranks.broadcast(outcome, owner=0)
    if error is not None:
        raise ScoutqError(error)
    return finished


def _prepare_destination(src: Path, dst: Path, identity: str, overwrite: bool) -> dict[str, str] | None:
    """Finished shards to keep (name -> sha256) when resuming, or None if DST is complete."""
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if dst_resolved == src_resolved or dst_resolved.is_relative_to(src_resolved) or src_resolved.is_relative_to(dst_resolved):
        raise ScoutqError(f"{dst}: the output must be outside the source checkpoint {src} (the source is never written)")
    if dst.exists() and not dst.is_dir():
        raise ScoutqError(f"{dst}: exists and is not a directory")
    if not dst.exists() or not any(dst.iterdir()):
        dst.mkdir(parents=True, exist_ok=True)
        return {}
    if not overwrite and read_manifest(dst, identity) is not None:
        return None
    if not overwrite and (journal := read_json_state(dst / JOURNAL_NAME, identity)) is not None:
        return dict(journal.get("shards", {}))
    if not overwrite:
        raise ScoutqError(
            f"{dst}: not empty and not an unfinished run of this same command; pass --overwrite to replace its contents"
        )
    for entry in dst.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return {}


def quantize_checkpoint(
    src: Path,
    plan: QuantPlan,
    checkpoint: Checkpoint,
    dst: Path,
    max_shard_bytes: int = 5 * 10**9,
    workers: int = 2,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    compile_kernels: bool | None = None,
    calibration: CalibrationRun | None = None,
    on_layer: LayerProgressFn | None = None,
    on_layer_step: ProgressFn | None = None,
    ranks: Ranks = SINGLE,
    device: torch.device | str = "cpu",
) -> QuantizeReport:
    """Write the quantized checkpoint `plan` describes into `dst` (resuming when possible).

    compile_kernels: fuse the RTN block kernels with torch.compile (None: when a C++ compiler
    exists and the input is large). The output bytes are identical either way.
    calibration: tokens and settings of a calibrated recipe; on_layer and on_layer_step
    report its layer walk (layer, layers) and the steps inside a layer.
    ranks: the processes of a multi-process run. Every rank takes part in the calibrated layer
    walk and computes its share of the round-to-nearest units; rank 0 alone prepares the
    destination and writes the shards (the others send it their units and return, with
    shards_reused 0 and nothing written).
    device: where the calibrated layer walk computes (round-to-nearest runs on the CPU threads).
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if plan.recipe.calibrated and calibration is None:
        raise ValueError(f"recipe {plan.recipe.name!r} is calibrated: pass its CalibrationRun")
    identity_body = run_identity(checkpoint, plan, max_shard_bytes)
    if calibration is not None:
        check_ranks(calibration, ranks)  # before DST is touched
        identity_body["calibration"] = calibration.identity()
    identity = _identity_hash(identity_body)
    finished = _prepare_on_writer(src, dst, identity, overwrite, ranks)
    bytes_in = sum(item.bytes_in for item in plan.items)
    bytes_out = sum(item.bytes_out for item in plan.items)
    shards = plan_shards(plan.specs, max_shard_bytes)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    if finished is None:
        if on_progress:
            on_progress(bytes_in)
        if ranks.writer:  # a run killed after its manifest, before its cleanup: finish the cleanup
            (dst / JOURNAL_NAME).unlink(missing_ok=True)
            shutil.rmtree(dst / CALIBRATION_DIR, ignore_errors=True)
        coverage = read_json_state(dst / COVERAGE_NAME) if calibration is not None else None
        return QuantizeReport(str(dst), identity, len(shards), len(shards), bytes_in, bytes_out,
                              time.perf_counter() - started, already_complete=True, warnings=plan.warnings,
                              coverage=coverage)

    # A journaled shard is kept only if its bytes still hash to what was recorded.
    kept = {name: digest for name, digest in finished.items() if name in names and (dst / name).is_file()
            and file_sha256(dst / name) == digest} if ranks.writer else {}
    journal: dict[str, Any] = {"identity": identity, "shards": dict(kept)}
    if ranks.writer:
        atomic_write_json(dst / JOURNAL_NAME, journal)

    kept = ranks.broadcast(kept, owner=0)

    calibrated, coverage = None, None
    if calibration is not None:
        calibrated, coverage = run_calibration(checkpoint, plan, calibration, dst / CALIBRATION_DIR, identity,
                                               on_layer, on_layer_step, ranks, device)

    shard_of = {spec.name: index for index, shard in enumerate(shards) for spec in shard}
    units = work_units(plan)
    todo = [unit for unit in units if any(names[shard_of[o]] not in kept for o in unit.outputs)]
    owners = _unit_owners(todo, calibrated, ranks)
    if compile_kernels is None:
        compile_kernels = rtn.compiler_available() and bytes_in > COMPILE_ABOVE_BYTES
    if not ranks.writer:
        with _rtn_settings(compile_kernels, workers):
            _send_owned(checkpoint, todo, owners, workers, ranks)
        return QuantizeReport(str(dst), identity, len(shards), 0, bytes_in, bytes_out, time.perf_counter() - started,
                              warnings=plan.warnings, coverage=coverage)
    skipped = sum(unit.bytes_in for unit in units) - sum(unit.bytes_in for unit in todo)
    if on_progress and skipped:
        on_progress(skipped)

    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    written = 0

    def pieces() -> Iterator[tuple[int, str, torch.Tensor]]:
        """(shard index, tensor name, whole tensor or row block) of every output still to write,
        in file order; a unit's progress is reported once its last piece has been taken."""
        for unit, outputs in _ordered_results(checkpoint, todo, workers, calibrated, owners, ranks):
            for name, piece in outputs:
                if names[shard_of[name]] not in kept:
                    yield shard_of[name], name, piece
            if on_progress:
                on_progress(unit.bytes_in)

    with _rtn_settings(compile_kernels, workers), closing(pieces()) as stream:
        for index, shard_pieces in itertools.groupby(stream, key=itemgetter(0)):
            with atomic_path(dst / names[index]) as partial:
                writer = StreamingWriter(partial, [(spec.name, spec.dtype, spec.shape) for spec in shards[index]])
                try:
                    for _, name, piece in shard_pieces:
                        writer.write(name, piece)
                        written += piece.numel() * piece.element_size()
                        if fault_after and written >= fault_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                # Journal first, then rename (leaving atomic_path): a shard under its final name
                # is always journaled, so an interrupt between the two never makes a resume
                # rewrite a finished shard.
                journal["shards"][names[index]] = writer.sha256.hexdigest()
                atomic_write_json(dst / JOURNAL_NAME, journal)
                fault_point("before-rename")

    _finalize(src, dst, checkpoint, plan, shards, names, journal["shards"], identity, identity_body, coverage)
    return QuantizeReport(str(dst), identity, len(shards), len(kept), bytes_in, bytes_out,
                          time.perf_counter() - started, warnings=plan.warnings, coverage=coverage)


@contextmanager
def _rtn_settings(compile_kernels: bool, workers: int) -> Iterator[None]:
    """Round-to-nearest's kernels (compiled or not) and threads (the workers share the cores)."""
    rtn.use_compiled(compile_kernels)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, torch_threads // max(workers, 1)))
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        rtn.use_compiled(False)


def _finalize(
    src: Path,
    dst: Path,
    checkpoint: Checkpoint,
    plan: QuantPlan,
    shards: list,
    names: list[str],
    shard_hashes: dict[str, str],
    identity: str,
    identity_body: dict[str, Any],
    coverage: dict[str, Any] | None,
) -> None:
    file_hashes = {name: shard_hashes[name] for name in names}
    if len(shards) > 1:
        weight_map = {spec.name: names[i] for i, shard in enumerate(shards) for spec in shard}
        total = sum(spec.nbytes for spec in plan.specs)
        atomic_write_json(dst / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        file_hashes[INDEX_NAME] = file_sha256(dst / INDEX_NAME)

    config = dict(checkpoint.config_json)
    config["quantization_config"] = quantization_config(plan, checkpoint.layout)
    atomic_write_json(dst / "config.json", config)
    file_hashes["config.json"] = file_sha256(dst / "config.json")

    # Tokenizer, generation config, chat template, processor configs: copied as they are.
    for entry in sorted(src.iterdir()):
        if (entry.is_file() and entry.name not in ("config.json", INDEX_NAME)
                and not entry.name.endswith(WEIGHT_FILES) and not entry.name.startswith(("scoutq-", "."))):
            with atomic_path(dst / entry.name) as partial:
                shutil.copyfile(entry, partial)
            file_hashes[entry.name] = file_sha256(dst / entry.name)

    if coverage is not None:
        atomic_write_json(dst / COVERAGE_NAME, coverage)
        file_hashes[COVERAGE_NAME] = file_sha256(dst / COVERAGE_NAME)

    fault_point("before-manifest")
    write_manifest(dst, {
        "format": "scoutq-manifest/1",
        "identity": identity,
        "versions": library_versions(),
        "recipe": identity_body["recipe"],
        "recipe_sha256": plan.recipe.fingerprint(),
        "source": {"path": str(src.resolve()), "fingerprint": identity_body["source_fingerprint"]},
        "quantized_modules": len(plan.quantized()),
        "bytes_in": sum(item.bytes_in for item in plan.items),
        "bytes_out": sum(item.bytes_out for item in plan.items),
        **({"calibration": identity_body["calibration"]} if "calibration" in identity_body else {}),
        "signed_scales": writes_signed_scales(plan),
    }, file_hashes)
    fault_point("after-manifest")
    (dst / JOURNAL_NAME).unlink(missing_ok=True)
    shutil.rmtree(dst / CALIBRATION_DIR, ignore_errors=True)


def writes_signed_scales(plan: QuantPlan) -> bool:
    """Does the output hold negative weight scales? Calibrated recipes with `signed_scales` put
    each symmetric group's largest-magnitude weight on the grid's negative end (-8 for int4), so
    its scale carries the weight's sign. Consumers that read scales as unsigned misread them."""
    if not plan.recipe.calibrated:
        return False
    from scoutq.calibrate.quantizer import CalibrationSettings

    return CalibrationSettings.from_recipe(plan.recipe).signed_scales and any(
        item.scheme is not None and item.scheme.symmetric for item in plan.quantized())


def estimate_peak_memory(plan: QuantPlan, workers: int) -> int:
    """Upper estimate of peak RSS: the runtime plus `workers + 1` units in flight plus one
    streamed block. A unit holds its source read, an fp32 row block per module and its outputs."""
    units = work_units(plan)
    in_flight = sorted(
        (unit.bytes_in + sum(item.bytes_out for item in unit.modules) + 2 * BLOCK_BYTES
         for unit in units if not unit.streamed), reverse=True)
    return RUNTIME_BASE_BYTES + sum(in_flight[: workers + 1]) + 3 * BLOCK_BYTES


__all__ = ["MANIFEST_NAME", "QuantizeReport", "estimate_peak_memory", "quantize_checkpoint", "work_units"]
