"""Read rows of a stored tensor with plain positioned reads, not mmap.

safetensors' `safe_open` maps the whole shard; every page a read touches then counts in the
process's resident memory until the map is dropped, so streaming a 5 GB shard through it
reports 5 GB of RSS. `os.pread` into a fresh buffer touches only the page cache, which the
kernel reclaims, and keeps a streaming job's footprint at its working set.
"""

from __future__ import annotations

import math
import os
import struct
from functools import lru_cache
from pathlib import Path

import torch

from scoutq.checkpoint.safetensors_io import DTYPES, ITEM_SIZE, TensorInfo
from scoutq.errors import CheckpointError, with_filename


def _data_start(file: Path) -> int:
    # Cached per file *version*: a file rewritten in place (new header length) must not be
    # read at the old offsets.
    stat = os.stat(file)
    return _cached_data_start(Path(file), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _cached_data_start(file: Path, inode: int, size: int, mtime_ns: int) -> int:
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
    return 8 + header_len


def read_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along dim 0 of a stored tensor, as a new tensor of its dtype."""
    row_shape = info.shape[1:]
    row_bytes = math.prod(row_shape) * ITEM_SIZE[info.dtype]
    count = stop - start
    buffer = _pread(info, start * row_bytes, count * row_bytes)
    if not buffer:
        return torch.empty((0, *row_shape), dtype=DTYPES[info.dtype])
    return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(count, *row_shape)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """A whole stored tensor (scalars included), as a new tensor of its dtype."""
    if info.shape:
        return read_rows(info, 0, info.shape[0])
    buffer = _pread(info, 0, ITEM_SIZE[info.dtype])
    return torch.frombuffer(buffer, dtype=DTYPES[info.dtype]).reshape(())


def _pread(info: TensorInfo, offset: int, size: int) -> bytearray:
    """`size` bytes from `offset` inside the tensor's data, read in full or a clear error."""
    buffer = bytearray(size)
    start = _data_start(info.file) + info.begin + offset
    view = memoryview(buffer)
    done = 0
    with open(info.file, "rb", buffering=0) as handle:
        now = os.fstat(handle.fileno()).st_size
        if info.file_size >= 0 and now != info.file_size:
            # Rewritten or truncated under the run: its header's offsets no longer describe it.
            raise CheckpointError(f"{info.file}: changed size while scoutq was reading it ({info.file_size:,} bytes "
                                  f"when opened, {now:,} now); the source must not change during a run")
        while done < size:
            try:
                got = os.preadv(handle.fileno(), [view[done:]], start + done)
            except OSError as err:  # EIO from a failing disk or network file system
                raise with_filename(err, info.file) from err
            if got == 0:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
            done += got
    return buffer
