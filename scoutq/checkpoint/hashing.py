"""sha256 of a file's bytes: the one helper behind manifests, `scoutq verify`, release SHA256SUMS
and fixture stamps, so every digest scoutq records is computed the same way."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

PROGRESS_BYTES = 16 * 1024 * 1024  # on_bytes is called about this often, not once per 256 KiB read


def file_sha256(path: str | Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of the file at `path` (hashlib.file_digest: 256 KiB reads into one reused buffer).

    on_bytes: progress, called with the byte counts hashed (every PROGRESS_BYTES and the rest at
    the end; the counts add up to the file's size).
    """
    with open(path, "rb", buffering=0) as handle:
        source = handle if on_bytes is None else _CountingReader(handle, on_bytes)
        return hashlib.file_digest(source, "sha256").hexdigest()


class _CountingReader:
    """The part of a raw file that hashlib.file_digest uses (readable, readinto), reporting progress."""

    def __init__(self, raw: io.RawIOBase, on_bytes: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_bytes = on_bytes
        self._pending = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        count = self._raw.readinto(buffer) or 0
        self._pending += count
        if self._pending and (self._pending >= PROGRESS_BYTES or count == 0):
            self._on_bytes(self._pending)
            self._pending = 0
        return count
