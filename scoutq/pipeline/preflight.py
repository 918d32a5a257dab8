"""Checks made from the plan before any work starts: disk space at DST and memory.

A real Scout run writes 58-110 GB over hours; finding out at hour three that the disk is full
(or being killed by the OOM killer) costs the hours. The plan knows the output's size and the
run's peak memory, so both are checked first.

Disk needed at DST: the output, plus one more shard (a shard is written whole under a hidden
name before its rename, and the finished ones are already there), plus, for a calibrated run,
the calibration state in DST/.scoutq-calibration (each layer's quantized modules, about the
output's size again, and the fp32 hidden states entering the next layer, twice while one
commit replaces the other). What a resumed run already wrote at DST counts as done.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.filesize import decimal as human_bytes

from scoutq.errors import ScoutqError, os_error_line


@dataclass(frozen=True)
class DiskCheck:
    path: Path  # the existing directory whose file system holds DST
    needed: int
    free: int

    @property
    def enough(self) -> bool:
        return self.free >= self.needed

    def line(self, target: Path) -> str:
        return (f"{target}: needs {human_bytes(self.needed)} ({self.needed:,} bytes) free on the file system of "
                f"{self.path}, which has {human_bytes(self.free)} ({self.free:,} bytes)")


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def calibration_state_bytes(bytes_out: int, tokens: int, hidden_size: int, fp_target: bool) -> int:
    """DST/.scoutq-calibration at its largest: the quantized layers and two hidden-state commits."""
    streams = 2 if fp_target else 1
    return bytes_out + 2 * streams * tokens * hidden_size * 4


def check_disk(target: Path, bytes_out: int, largest_piece: int, state_bytes: int = 0,
               work: list[Path] | None = None) -> DiskCheck:
    """Free space at `target` against what the run will write.

    Args:
        target: DST (a directory, or a GGUF file).
        bytes_out: the output's size from the plan.
        largest_piece: what is written beside the output before a rename (the largest shard).
        state_bytes: calibration state kept while the run lasts.
        work: paths whose bytes a resumed run has already written (DST, the GGUF work file).
    """
    done = sum(_bytes_under(path) for path in (work if work is not None else [target]))
    needed = max(0, bytes_out + largest_piece + state_bytes - done)
    where = existing_ancestor(target)
    return DiskCheck(where, needed, shutil.disk_usage(where).free)


def require_writable(target: Path) -> None:
    """A read-only file system at DST (root's writes fail there too) is refused before any work."""
    where = existing_ancestor(target)
    if os.statvfs(where).f_flag & os.ST_RDONLY:
        raise ScoutqError(os_error_line(OSError(errno.EROFS, os.strerror(errno.EROFS), str(where))))


def require_disk(check: DiskCheck, target: Path) -> None:
    if not check.enough:
        raise ScoutqError(f"not enough disk space: {check.line(target)}; free space or choose another --out")


def available_memory() -> int | None:
    """Bytes this process may still use: the cgroup limit (v2, then v1) minus its usage when one
    is set, else the kernel's MemAvailable. None where neither can be read."""
    candidates = []
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            candidates.append(int(limit) - usage)
            break
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not candidates:
        return None
    return max(0, min(candidates))


def memory_warning(peak: int, calibrated: bool) -> str | None:
    """One line when the estimated peak does not fit in the memory available, else None."""
    if os.environ.get("SCOUTQ_MEMORY_AVAILABLE"):  # tests and users can state it outright
        available: int | None = int(os.environ["SCOUTQ_MEMORY_AVAILABLE"])
    else:
        available = available_memory()
    if available is None or peak <= available:
        return None
    lower = "--workers 1, a smaller --samples or --seq-len" if calibrated else "--workers 1"
    return (f"the estimated peak memory {human_bytes(peak)} exceeds the {human_bytes(available)} available "
            f"(cgroup limit or MemAvailable); the run may be killed by the OOM killer: {lower} lower it")
