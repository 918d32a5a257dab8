"""Sharded safetensors output in the Hugging Face layout, written atomically.

Each shard is streamed to a hidden temporary name in the destination and renamed when its
last byte is written and synced; the index is written last, the same way. A reader therefore
never sees a half-written shard under a real name, and a crash leaves only `.partial` files.

`atomic_path` is that one pattern for any file or directory scoutq writes; `atomic_write_json`
and `read_json_state` are the write and the tolerant read of small JSON state files (journals,
stamps, manifests).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scoutq.checkpoint.safetensors_io import ITEM_SIZE, StreamingWriter

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_SIZE[self.dtype]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write `path` all at once: yields the hidden temporary `.NAME.partial` beside it, to be
    written (a file, or a directory) inside the block.

    When the block ends normally the temporary is fsynced (a directory: its entries, not its
    files, which each writer syncs itself) and `os.replace`d onto `path`, so readers see the old
    content or the whole new one, never a part. When it raises, the temporary is removed. A
    temporary left by an earlier crash is removed before the block starts. `path` must not be a
    non-empty directory when the block ends (rename cannot replace one).
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    _remove(partial)
    try:
        yield partial
        fsync_path(partial)
        os.replace(partial, path)
    except BaseException:
        _remove(partial)
        raise


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory's entries."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as partial:
        partial.write_bytes(data)


def atomic_write_json(path: str | Path, value: object) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def read_json_state(path: str | Path, identity: str | None = None) -> dict[str, Any] | None:
    """A JSON object written by atomic_write_json, or None when it is missing, unreadable, not
    a JSON object, or (with `identity`) its "identity" field differs: state from another run,
    or none, which the caller then starts afresh."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(value, dict) or (identity is not None and value.get("identity") != identity):
        return None
    return value


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [shard for shard in shards if shard]


def shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_sharded(
    directory: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], Iterator[torch.Tensor]],
    max_shard_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write tensors into HF-named shards plus an index (when more than one shard).

    Args:
        directory: destination (must exist).
        specs: every tensor, in file order.
        produce: yields a tensor's data, whole or as row-major pieces (e.g. one expert at a time).
        max_shard_bytes: shard size bound.
        on_bytes: progress callback, called with the byte count of each written piece.

    Returns:
        The shard paths written.
    """
    directory = Path(directory)
    shards = plan_shards(specs, max_shard_bytes)
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards):
        final = directory / shard_name(number, len(shards))
        with atomic_path(final) as partial:
            writer = StreamingWriter(partial, [(s.name, s.dtype, s.shape) for s in shard])
            try:
                for spec in shard:
                    for piece in produce(spec):
                        writer.write(spec.name, piece)
                        if on_bytes:
                            on_bytes(piece.numel() * piece.element_size())
                writer.close()
            except BaseException:
                writer.abort()
                raise
        paths.append(final)
        weight_map |= {spec.name: final.name for spec in shard}
    if len(shards) > 1:
        total = sum(spec.nbytes for spec in specs)
        atomic_write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths
