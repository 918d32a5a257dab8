"""`scoutq quantize --recipe gguf-*`: one GGUF file for llama.cpp, streamed and resumable.

    plan ──▶ header (gguf's GGUFWriter: metadata, tokenizer, tensor infos) ──▶ DST work file
         ──▶ per tensor, per expert, per row block: read ─▶ quantize (ggml blocks) ─▶ append
         ──▶ fsync, rename onto DST

* The header comes from the `gguf` package (llama.cpp's own writer library); the tensor data
  that follows it is appended piece by piece at the offsets that header promises (aligned to
  the file's alignment), so no tensor is ever whole in memory: a stacked expert tensor is
  written one expert at a time, large matrices in row blocks.
* Work state lives in a hidden folder beside DST (`.NAME.scoutq/`): the file being written,
  a journal of finished tensors with their sha256, and the calibration layers of a calibrated
  recipe. A rerun of the same command checks the header and every journaled tensor's bytes,
  cuts the file after the last good one and writes the rest; a finished DST whose
  `scoutq.identity` matches is left alone. The same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scoutq.calibrate.estimate import RUNTIME_BASE_BYTES
from scoutq.calibrate.job import CalibrationRun, LayerProgressFn, check_ranks, run_calibration
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.writer import atomic_write_json, fsync_path, read_json_state
from scoutq.errors import ScoutqError, with_filename
from scoutq.pipeline.gguf_data import ROW_BLOCK_BYTES, TensorData
from scoutq.pipeline.gguf_metadata import ALIGNMENT, header_bytes, read_identity
from scoutq.pipeline.quantize import FAULT_ENV, SINGLE, QuantizeReport, _identity_hash, run_identity
from scoutq.quant.gguf_plan import GgufTensor, gguf_tensors
from scoutq.quant.plan import QuantPlan
from scoutq.stream.hooks import ProgressFn
from scoutq.stream.processes import Ranks

FORMAT_VERSION = "scoutq-gguf/1"  # bumps when the same inputs would give other bytes
JOURNAL = "journal.json"
WORK_FILE = "model.gguf"


def work_dir(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.scoutq")


def _padded(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def export_gguf(
    src: Path,
    plan: QuantPlan,
    checkpoint: Checkpoint,
    dst: Path,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    calibration: CalibrationRun | None = None,
    on_layer: LayerProgressFn | None = None,
    on_layer_step: ProgressFn | None = None,
    ranks: Ranks = SINGLE,
    device: torch.device | str = "cpu",
) -> QuantizeReport:
    """Write the GGUF file `plan` describes to `dst` (resuming an interrupted run when possible).

    on_progress is called with source bytes as they are consumed. With several ranks, all take
    part in the calibrated layer walk and rank 0 alone writes the file.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if plan.recipe.calibrated and calibration is None:
        raise ValueError(f"recipe {plan.recipe.name!r} is calibrated: pass its CalibrationRun")
    tensors = gguf_tensors(checkpoint, plan)
    identity_body = run_identity(checkpoint, plan, 0) | {
        "format": FORMAT_VERSION, "tensors": [[t.name, t.kind, list(t.shape)] for t in tensors]}
    if calibration is not None:
        check_ranks(calibration, ranks)
        identity_body["calibration"] = calibration.identity()
    identity = _identity_hash(identity_body)
    bytes_in = sum(t.bytes_in for t in tensors)
    bytes_out = sum(t.nbytes for t in tensors)

    def report(reused: int, complete: bool = False) -> QuantizeReport:
        return QuantizeReport(str(dst), identity, 1, reused, bytes_in, bytes_out, time.perf_counter() - started,
                              already_complete=complete, warnings=plan.warnings)

    complete = ranks.broadcast(_check_destination(src, dst, identity, overwrite) if ranks.writer else None, owner=0)
    if complete:
        if on_progress:
            on_progress(bytes_in)
        return report(1, complete=True)

    work = work_dir(dst)
    if ranks.writer:
        work.mkdir(parents=True, exist_ok=True)
    calibrated = None
    if calibration is not None:
        calibrated, _ = run_calibration(checkpoint, plan, calibration, work / "calibration", identity,
                                        on_layer, on_layer_step, ranks, device)
    if not ranks.writer:
        return report(0)

    header = header_bytes(checkpoint, plan, tensors, identity, work)
    done = _resume_point(work, identity, header, tensors)
    data = TensorData(checkpoint, calibrated)
    if on_progress and done:
        on_progress(sum(t.bytes_in for t in tensors[: len(done)]))
    _write(work / WORK_FILE, header, tensors, done, data, identity, work / JOURNAL, on_progress)

    os.replace(work / WORK_FILE, dst)
    fsync_path(dst.parent)  # the rename itself is durable
    shutil.rmtree(work, ignore_errors=True)
    return report(0)


def _check_destination(src: Path, dst: Path, identity: str, overwrite: bool) -> bool:
    """True when DST is already this run's finished file; refuses DST paths that would lose data."""
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if dst_resolved.is_relative_to(src_resolved):
        raise ScoutqError(f"{dst}: the output must be outside the source checkpoint {src} (the source is never written)")
    if dst.is_dir():
        raise ScoutqError(f"{dst}: is a directory; a GGUF output is one file (for example {dst / 'model.gguf'})")
    if not dst.parent.is_dir():
        raise ScoutqError(f"{dst.parent}: no such directory")
    if dst.exists():
        if not overwrite and read_identity(dst) == identity:
            return True
        if not overwrite:
            raise ScoutqError(f"{dst}: exists and is not this command's finished output; pass --overwrite to replace it")
    if overwrite:
        shutil.rmtree(work_dir(dst), ignore_errors=True)
    return False


def _resume_point(work: Path, identity: str, header: bytes, tensors: list[GgufTensor]) -> list[str]:
    """The sha256 of each tensor already written and still intact in the work file; the file is
    cut after the last of them (an empty list: start afresh)."""
    path = work / WORK_FILE
    journal = read_json_state(work / JOURNAL, identity)
    if journal is None or not path.is_file():
        return []
    good: list[str] = []
    with path.open("rb") as handle:
        if handle.read(len(header)) != header:
            return []
        offset = _padded(len(header))
        for tensor, digest in zip(tensors, journal.get("tensors", []), strict=False):
            handle.seek(offset)
            hasher = hashlib.sha256()
            remaining = tensor.nbytes
            while remaining:
                chunk = handle.read(min(remaining, 1 << 24))
                if not chunk:
                    break
                hasher.update(chunk)
                remaining -= len(chunk)
            if remaining or hasher.hexdigest() != digest:
                break
            good.append(digest)
            offset += _padded(tensor.nbytes)
    return good


def _write(path: Path, header: bytes, tensors: list[GgufTensor], done: list[str], data: TensorData, identity: str,
           journal_path: Path, on_progress: Callable[[int], None] | None) -> None:
    journal: dict[str, Any] = {"identity": identity, "tensors": list(done)}
    offset = _padded(len(header)) + sum(_padded(t.nbytes) for t in tensors[: len(done)])
    mode = "r+b" if done else "wb"
    try:
        _write_tensors(path, mode, header, tensors, done, data, journal, journal_path, offset, on_progress)
    except OSError as err:  # a write, truncate or fsync on the open handle names no file
        raise with_filename(err, path) from err


def _write_tensors(path: Path, mode: str, header: bytes, tensors: list[GgufTensor], done: list[str],
                   data: TensorData, journal: dict[str, Any], journal_path: Path, offset: int,
                   on_progress: Callable[[int], None] | None) -> None:
    fault_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    written = 0
    with path.open(mode) as handle:
        if not done:
            handle.write(header)
            handle.write(b"\0" * (_padded(len(header)) - len(header)))
        handle.truncate(offset)
        handle.seek(offset)
        for tensor in tensors[len(done):]:
            hasher = hashlib.sha256()
            size = 0
            for piece in data.pieces(tensor):
                raw = piece.contiguous().numpy()  # written and hashed through the buffer, not copied
                hasher.update(raw)
                handle.write(raw)
                size += raw.nbytes
                written += raw.nbytes
                if fault_after and written >= fault_after:
                    handle.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            if size != tensor.nbytes:
                raise AssertionError(f"{tensor.name}: wrote {size} bytes, the header promised {tensor.nbytes}")
            handle.write(b"\0" * (_padded(size) - size))
            handle.flush()
            os.fsync(handle.fileno())
            journal["tensors"].append(hasher.hexdigest())
            atomic_write_json(journal_path, journal)
            if on_progress:
                on_progress(tensor.bytes_in)


def estimate_export_memory(tensors: list[GgufTensor]) -> int:
    """Upper estimate of peak RSS: the runtime, the largest source read (one expert's block or a
    row block) twice over (read and its fp32 rows), and the quantizer's row-block temporaries."""
    largest = max((part.bytes_in for tensor in tensors for part in tensor.parts), default=0)
    return RUNTIME_BASE_BYTES + 2 * min(largest, 4 * ROW_BLOCK_BYTES) + largest + 8 * ROW_BLOCK_BYTES
