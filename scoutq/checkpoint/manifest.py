"""scoutq-manifest.json: what a quantized output was made from, and the hash of every file.

Written last, so its presence marks a finished output; `scoutq verify` re-hashes against it.
No timestamps or host names: the same inputs give a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

from scoutq.checkpoint.reader import INDEX_NAME, Checkpoint
from scoutq.checkpoint.rows import _data_start

MANIFEST_NAME = "scoutq-manifest.json"


def source_fingerprint(checkpoint: Checkpoint) -> str:
    """sha256 over config.json, the index and every shard's name, size and header.

    Hashing 217 GB of tensor data would take longer than quantizing it; the headers pin
    every tensor's name, dtype, shape and offsets, and the size pins the data length.
    """
    digest = hashlib.sha256()
    for name in ("config.json", INDEX_NAME):
        path = checkpoint.directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    for shard in checkpoint.shard_files:
        with open(shard, "rb") as handle:
            header = handle.read(_data_start(shard))
        digest.update(f"{shard.name}\0{shard.stat().st_size}\0".encode() + header)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import safetensors
    import torch

    from scoutq import __version__

    return {"scoutq": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def write_manifest(directory: Path, body: dict[str, Any], file_hashes: dict[str, str]) -> dict[str, Any]:
    """Write the manifest atomically; `file_hashes` must cover every other file in directory."""
    from scoutq.checkpoint.writer import atomic_write_json

    manifest = {**body, "files": {name: file_hashes[name] for name in sorted(file_hashes)}}
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: Path, identity: str | None = None) -> dict[str, Any] | None:
    """The manifest, or None when missing or unreadable (or, with `identity`, of another run)."""
    from scoutq.checkpoint.writer import read_json_state

    return read_json_state(Path(directory) / MANIFEST_NAME, identity)
