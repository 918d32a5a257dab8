"""Faults a long run meets in the field: each is one line and exit 1, and the same command then
resumes to exactly the bytes of an uninterrupted run.

Disk faults are injected at the write call (the file object the shard writer writes through):
a size-limited file system needs privileges this suite does not assume.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.cli import quantize_or_fail, run_cli

from scoutq.checkpoint import safetensors_io
from scoutq.checkpoint.lock import lock_path
from scoutq.pipeline import preflight

SHARDS = ["--max-shard-size", "2MB"]  # tiny-trained w4a16-g128: 7.4 MB, so several shards


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def clean_run(tiny_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    dst = tmp_path_factory.mktemp("faults") / "clean"
    quantize_or_fail(tiny_trained, "w4a16-g128", dst, *SHARDS)
    return _digests(dst)


class _FailingFile:
    """A writable file that raises `code` once `budget` bytes have been written through it."""

    written = 0

    def __init__(self, path: Path, code: int, budget: int):
        self._inner = builtins.open(path, "wb")  # noqa: SIM115 - closed through close()
        self._code, self._budget = code, budget

    def write(self, data: bytes | memoryview) -> int:
        if _FailingFile.written + len(data) > self._budget:
            raise OSError(self._code, os.strerror(self._code))  # as the kernel reports it: no file name
        _FailingFile.written += len(data)
        return self._inner.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "No space left on device (ENOSPC)"),
                                            (errno.EDQUOT, "(EDQUOT)"), (errno.EROFS, "Read-only file system (EROFS)"),
                                            (errno.EIO, "(EIO)"), (errno.EACCES, "Permission denied (EACCES)")])
def test_write_fault_is_one_line_and_the_rerun_resumes_byte_identical(
    code: int, said: str, tiny_trained: Path, clean_run: dict[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    dst = tmp_path / "out"
    _FailingFile.written = 0
    with monkeypatch.context() as patch:
        patch.setattr(safetensors_io, "open", lambda path, mode="r", *rest: _FailingFile(path, code, 5_000_000)
                      if mode == "wb" and Path(path).is_relative_to(dst) else builtins.open(path, mode, *rest),
                      raising=False)
        failed, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst),
                                  *SHARDS], capsys)
    assert failed == 1
    lines = [line for line in err.splitlines() if line.strip()]
    line = " ".join(" ".join(lines).split())
    assert "Traceback" not in err and said in line and ".safetensors.partial" in line, err
    assert not (dst / "scoutq-manifest.json").exists()  # nothing that looks complete
    assert any(name.startswith("model-") for name in os.listdir(dst))  # finished shards kept for the resume
    resumed, out, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst),
                                 *SHARDS], capsys)
    assert resumed == 0, err
    assert "reused from an interrupted run" in out
    assert _digests(dst) == clean_run


def test_read_fault_names_the_source_file(tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from scoutq.checkpoint import rows

    def failing_preadv(*_: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(rows.os, "preadv", failing_preadv)
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 1 and "Traceback" not in err
    line = " ".join(err.split())
    assert "Input/output error (EIO)" in line and ".safetensors" in line and str(tiny_trained) in line


def test_preflight_refuses_when_the_disk_is_too_small(tiny_trained: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1_000_000})())
    dst = tmp_path / "out"
    code, out, _ = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst),
                            "--dry-run"], capsys)
    assert code == 0 and "NOT enough" in " ".join(out.split())
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst)], capsys)
    line = " ".join(err.split())
    assert code == 1 and "not enough disk space" in line and "1,000,000 bytes" in line and "Traceback" not in err
    assert not dst.exists()  # refused before any work


def test_lock_held_by_a_live_process_is_refused(tiny_trained: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    dst = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(dst).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0,
                                              "command": "scoutq quantize (the other run)"}))
        code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst)], capsys)
    finally:
        holder.kill()
        holder.wait()
    line = " ".join(err.split())
    assert code == 1 and f"is being written by pid {holder.pid}" in line and "Traceback" not in err
    assert not dst.exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_trained: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dst = tmp_path / "out"
    lock_path(dst).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst)], capsys)
    assert code == 0, err
    assert not lock_path(dst).exists()  # released on exit


def test_lock_from_another_host_is_refused_with_its_owner(tmp_path: Path) -> None:
    from scoutq.checkpoint.lock import output_lock
    from scoutq.errors import ScoutqError

    dst = tmp_path / "out"
    lock_path(dst).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 0}))
    with pytest.raises(ScoutqError, match=r"elsewhere\.example since .*another host"), output_lock(dst):
        pass


def test_a_worker_that_raises_stops_the_run_naming_what_it_held(
    tiny_trained: Path, clean_run: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scoutq.pipeline import quantize

    real = quantize._produce

    def broken(checkpoint: object, unit: quantize.Unit, calibrated: object) -> object:
        if any(".layers.2.feed_forward.experts.5." in item.module.name for item in unit.modules):
            raise RuntimeError("simulated kernel failure")
        return real(checkpoint, unit, calibrated)

    dst = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(quantize, "_produce", broken)
        code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst),
                                *SHARDS], capsys)
    line = " ".join(err.split())
    assert code == 1 and "Traceback" not in err
    assert "a quantization worker failed on" in line and "layers.2.feed_forward.experts.5." in line
    assert "simulated kernel failure" in line
    assert not (dst / "scoutq-manifest.json").exists()
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst), *SHARDS],
                           capsys)
    assert code == 0, err
    assert _digests(dst) == clean_run


@pytest.mark.parametrize("point", ["before-rename", "before-manifest", "after-manifest"])
def test_sigkill_at_the_final_steps_then_resume_byte_identical(
    point: str, tiny_trained: Path, clean_run: dict[str, str], tmp_path: Path
) -> None:
    """Killed between journaling a shard and renaming it, before the manifest, or after it but
    before the journal is removed: the same command ends exactly where an uninterrupted run does."""
    from scoutq.pipeline.quantize import FAULT_POINT_ENV

    dst = tmp_path / "out"
    command = [sys.executable, "-m", "scoutq.cli.app", "quantize", str(tiny_trained), "--recipe", "w4a16-g128",
               "--out", str(dst), *SHARDS]
    env = {k: v for k, v in os.environ.items() if k != "SCOUTQ_DEBUG"}
    killed = subprocess.run(command, env={**env, FAULT_POINT_ENV: point}, capture_output=True, text=True,
                            timeout=300, check=False)
    assert killed.returncode == -9, killed.stderr
    assert lock_path(dst).exists()  # a SIGKILL leaves the lock: the rerun must see its owner is dead
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert _digests(dst) == clean_run
    assert not lock_path(dst).exists()


def test_gguf_export_disk_full_is_one_line_and_the_rerun_resumes_byte_identical(
    tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC from fsync (where a delayed-allocation file system reports a full disk) on the GGUF
    writer's open file: the line names the work file, and the rerun continues from its journal."""
    from scoutq.pipeline import gguf_export

    clean = tmp_path / "clean.gguf"
    quantize_or_fail(tiny_trained, "gguf-q4_0", clean)
    dst = tmp_path / "out.gguf"
    real_fsync, calls = os.fsync, [0]

    def filling_fsync(descriptor: int) -> None:
        calls[0] += 1
        if calls[0] == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    with monkeypatch.context() as patch:
        patch.setattr(gguf_export.os, "fsync", filling_fsync)
        failed, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "gguf-q4_0", "--out", str(dst)], capsys)
    line = " ".join(err.split())
    assert failed == 1 and "Traceback" not in err and "No space left on device (ENOSPC)" in line, err
    assert str(gguf_export.work_dir(dst)) in line, line
    assert not dst.exists()  # nothing that looks complete
    journal = json.loads((gguf_export.work_dir(dst) / gguf_export.JOURNAL).read_text())
    assert journal["tensors"], "the tensors written before the fault are journaled for the rerun"
    resumed, out, err = run_cli(["quantize", str(tiny_trained), "--recipe", "gguf-q4_0", "--out", str(dst)], capsys)
    assert resumed == 0, err
    assert dst.read_bytes() == clean.read_bytes()


def test_source_changed_or_deleted_under_the_run_is_one_line(tiny_trained: Path, tmp_path: Path) -> None:
    from scoutq.checkpoint.reader import Checkpoint
    from scoutq.errors import CheckpointError, os_error_line

    source = tmp_path / "src"
    shutil.copytree(tiny_trained, source)
    checkpoint = Checkpoint.open(source)
    name = next(iter(checkpoint.tensors))
    shard = checkpoint.tensors[name].file
    with open(shard, "ab") as grown:  # a shard rewritten (here: grown) after the plan was made
        grown.write(b"\0" * 64)
    with pytest.raises(CheckpointError, match="changed size while scoutq was reading it"):
        checkpoint.read(name)
    shard.unlink()  # and deleted
    with pytest.raises(FileNotFoundError) as gone:
        checkpoint.read(name)
    line = os_error_line(gone.value)
    assert str(shard) in line and "(ENOENT)" in line and "deleted while scoutq ran" in line


def test_eval_writing_reports_held_by_another_run_is_refused(tiny_trained: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    report = tmp_path / "report.json"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(report).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 0}))
        code, _, err = run_cli(["eval", str(tiny_trained), "--samples", "2", "--json", str(report)], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1 and f"is being written by pid {holder.pid}" in " ".join(err.split())
    assert not report.exists()
    code, _, err = run_cli(["eval", str(tiny_trained), "--samples", "2", "--json", str(report)], capsys)
    assert code == 0, err
    assert report.is_file() and not lock_path(report).exists()


# -- a real size-limited and a real read-only file system, where this machine lets root mount --


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount_tmpfs(size="9m", read_only=False) -> a fresh tmpfs mount point; skips where mounting
    is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the injected "
                        "faults above cover the same paths")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], capture_output=True, check=False)


def test_real_small_file_system_is_refused_before_any_work(
    tiny_trained: Path, mount_tmpfs: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    small = mount_tmpfs("4m")
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(small / "out"),
                            *SHARDS], capsys)
    line = " ".join(err.split())
    assert code == 1 and "not enough disk space" in line and str(small) in line, err
    assert list(small.iterdir()) == []


def test_real_enospc_mid_run_then_resume_after_space_is_freed(
    tiny_trained: Path, clean_run: dict[str, str], mount_tmpfs: Callable[..., Path],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills after the pre-flight (another job writing there): the kernel's own ENOSPC."""
    small = mount_tmpfs("5m")
    dst = small / "out"
    with monkeypatch.context() as patch:  # the pre-flight saw enough space; then someone else took it
        patch.setattr(preflight.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1 << 40})())
        code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst),
                                *SHARDS], capsys)
    line = " ".join(err.split())
    assert code == 1 and "No space left on device (ENOSPC)" in line and "Traceback" not in err, err
    assert f"{dst}/.model-" in line  # the file being written, named
    assert not (dst / "scoutq-manifest.json").exists()
    grown = subprocess.run(["mount", "-o", "remount,size=64m", str(small)], capture_output=True, text=True,
                           check=False)
    assert grown.returncode == 0, grown.stderr  # "free space"
    code, out, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(dst), *SHARDS],
                             capsys)
    assert code == 0, err
    assert "reused from an interrupted run" in out
    assert _digests(dst) == clean_run


def test_real_read_only_destination_is_one_line(tiny_trained: Path, mount_tmpfs: Callable[..., Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    read_only = mount_tmpfs("1m", read_only=True)
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out",
                            str(read_only / "out")], capsys)
    line = " ".join(err.split())
    assert code == 1 and "Read-only file system (EROFS)" in line and str(read_only) in line, err
    assert "Traceback" not in err and "choose another --out" in line  # refused before any work
