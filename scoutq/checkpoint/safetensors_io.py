"""The safetensors file format, read and written without loading tensors.

Reading: `read_header` parses and validates a file's header (length prefix, JSON, dtypes,
offsets against the file's real size) so a truncated or corrupt shard is reported by name
before any tensor is touched. Tensor data is then read lazily through `safe_open` (mmap).

Writing: `StreamingWriter` writes the header first, from the declared names, dtypes and
shapes, then accepts tensor bytes in that order, so a 2.7 GB fused expert tensor can be
written one expert slice at a time. Format reference: the safetensors README (8-byte
little-endian header length, JSON header, data buffer; header padded with spaces to 8 bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from scoutq.errors import CheckpointError, with_filename

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
ITEM_SIZE: dict[str, int] = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}

# A real header is a few hundred KB at most (Scout's largest shard has ~50 tensors); anything
# near this is a corrupt length prefix, and refusing it avoids allocating gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024
FLUSH_EVERY_BYTES = 256 * 1024 * 1024  # StreamingWriter starts background writeback this often


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and byte range in the data buffer."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file_size: int = -1  # the file's size when its header was read (-1: unknown); a read checks it

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns (tensors by name, __metadata__)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {header_len} header bytes, file has {size})"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension in shape {list(shape)}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        expected = math.prod(shape) * ITEM_SIZE[dtype]
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{end}, inconsistent with {dtype}{list(shape)}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data but the file holds {data_size}"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, begin, end, size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed header for tensors stored in the given order (name, dtype name, shape)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * ITEM_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data must start 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class StreamingWriter:
    """Writes one safetensors file whose tensors arrive in declared order, possibly in pieces.

    The caller declares every tensor up front; `write(name, piece)` appends bytes of the named
    tensor (pieces of one tensor must arrive in row-major order, e.g. expert by expert).
    The file only becomes valid when `close()` confirms every declared byte was written.
    `sha256` hashes every byte written, so a finished file's digest costs no second read.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._entries = entries
        self._remaining = {name: math.prod(shape) * ITEM_SIZE[dtype] for name, dtype, shape in entries}
        self._dtypes = {name: dtype for name, dtype, _ in entries}
        self._order = [name for name, _, _ in entries]
        self._cursor = 0
        self._handle: BinaryIO = open(self.path, "wb")
        self._unflushed = 0
        self._flusher: threading.Thread | None = None
        self.sha256 = hashlib.sha256()
        self._emit(header_bytes(entries, metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        try:
            self._handle.write(data)
        except OSError as err:  # a full disk, a quota, an I/O error: say which file
            raise with_filename(err, self.path) from err
        self.sha256.update(data)
        self._unflushed += len(data)
        if self._unflushed >= FLUSH_EVERY_BYTES and (self._flusher is None or not self._flusher.is_alive()):
            # Start writeback now, on a helper thread, instead of leaving gigabytes of dirty
            # pages for close(): the disk then works while the next tensors are computed.
            self._unflushed = 0
            self._handle.flush()
            self._flusher = threading.Thread(target=os.fdatasync, args=(self._handle.fileno(),), daemon=True)
            self._flusher.start()

    def write(self, name: str, piece: torch.Tensor) -> None:
        if name not in self._remaining:
            raise ValueError(f"tensor {name!r} was not declared")
        if piece.numel() == 0 and DTYPE_NAMES.get(piece.dtype) == self._dtypes[name]:
            return  # no bytes to place; a zero-size tensor would otherwise look written out of order
        while self._cursor < len(self._order) and self._remaining[self._order[self._cursor]] == 0:
            self._cursor += 1
        if self._cursor >= len(self._order) or self._order[self._cursor] != name:
            raise ValueError(f"tensor {name!r} written out of declared order")
        if DTYPE_NAMES[piece.dtype] != self._dtypes[name]:
            raise ValueError(f"tensor {name!r}: declared {self._dtypes[name]}, got {piece.dtype}")
        data = piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._remaining[name]:
            raise ValueError(f"tensor {name!r}: more bytes written than its declared shape holds")
        self._emit(memoryview(data))
        self._remaining[name] -= data.nbytes

    def close(self) -> None:
        missing = [name for name, left in self._remaining.items() if left]
        if missing:
            self._handle.close()
            raise ValueError(f"{self.path}: tensors not completely written: {missing[:3]}")
        try:
            self._handle.flush()
            if self._flusher is not None:
                self._flusher.join()
            os.fsync(self._handle.fileno())
        except OSError as err:
            raise with_filename(err, self.path) from err
        self._handle.close()

    def abort(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
        try:
            self._handle.close()  # flushes what is buffered, which can fail the same way (a full disk)
        except OSError:
            pass  # the partial file is discarded: the error that stopped the write is the one to report
