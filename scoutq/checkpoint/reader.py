"""Open a Hugging Face Llama 4 checkpoint directory and read tensors lazily.

`Checkpoint.open` validates the directory up front, reading headers only: config.json, the
shard index (every file inside the directory, every indexed tensor present in its shard),
and each shard's header against its real size. Tensor data is read on demand with positioned
reads (rows.py; not safetensors' mmap, whose touched pages would stay resident), and a routed
expert is read as its own rows of the fused tensors, so reading expert 3 of a 2.7 GB
`gate_up_proj` touches 1/16 of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scoutq.checkpoint.config import TextConfig, parse_text_config, read_config_json
from scoutq.checkpoint.layout import (
    MULTIMODAL,
    TEXT_ONLY,
    KeyRole,
    Layout,
    detect_layout,
    expected_text_shapes,
    expected_vision_shapes,
)
from scoutq.checkpoint.rows import read_rows, read_tensor
from scoutq.checkpoint.safetensors_io import DTYPES, TensorInfo, read_header
from scoutq.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _resolve_shard(directory: Path, name: object) -> Path:
    """The shard path an index names, refusing anything that leaves the directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{directory / INDEX_NAME}: invalid shard file name {name!r}")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(f"{directory / INDEX_NAME}: shard {name!r} points outside the checkpoint directory")
    resolved = (directory / candidate).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise CheckpointError(f"{directory / INDEX_NAME}: shard {name!r} points outside the checkpoint directory")
    return directory / candidate


def require_directory(path: str | Path, what: str = "a checkpoint directory") -> Path:
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected {what})")
    return directory


def read_index(directory: Path) -> dict[str, Any]:
    """model.safetensors.index.json, checked to be JSON with a non-empty weight_map."""
    path = directory / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise CheckpointError(f"{path}: not valid JSON ({bad})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: missing or empty weight_map")
    return index


@dataclass
class Checkpoint:
    """A validated checkpoint directory: its config, layout and every tensor's location."""

    directory: Path
    config_json: dict[str, Any]
    config: TextConfig
    layout: Layout
    tensors: dict[str, TensorInfo]
    shard_files: list[Path]
    weightless: bool = False  # built from config.json alone: shapes, no data

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        directory = require_directory(path)
        config_json = read_config_json(directory)
        config = parse_text_config(config_json)

        if (directory / INDEX_NAME).is_file():
            weight_map = read_index(directory)["weight_map"]
            files = {name: _resolve_shard(directory, file) for name, file in weight_map.items()}
        elif (directory / SINGLE_NAME).is_file():
            files = None
        else:
            raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME}; not a safetensors checkpoint")

        shard_files = sorted(set(files.values())) if files is not None else [directory / SINGLE_NAME]
        headers: dict[Path, dict[str, TensorInfo]] = {}
        for shard in shard_files:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard missing (named in {INDEX_NAME})")
            headers[shard], _ = read_header(shard)

        if files is None:
            tensors = headers[shard_files[0]]
        else:
            tensors = {}
            for name, shard in files.items():
                info = headers[shard].get(name)
                if info is None:
                    raise CheckpointError(f"{shard}: tensor {name!r} is named in {INDEX_NAME} but not stored in this shard")
                tensors[name] = info

        layout = detect_layout(tensors.keys())
        if layout is None:
            raise CheckpointError(f"{directory}: no Llama 4 text weights found (expected language_model.model.* or model.* keys)")
        return cls(directory, config_json, config, layout, tensors, shard_files)

    @classmethod
    def open_for_planning(cls, path: str | Path) -> Checkpoint:
        """Open a checkpoint, or, for a directory holding only config.json, describe the tensors
        config.json implies (no data). Planning and dry runs need nothing more."""
        directory = Path(path)
        if directory.is_dir() and not (directory / INDEX_NAME).exists() and not (directory / SINGLE_NAME).exists() \
                and (directory / "config.json").is_file():
            return cls.from_config_only(directory)
        return cls.open(directory)

    @classmethod
    def from_config_only(cls, directory: Path) -> Checkpoint:
        config_json = read_config_json(directory)
        config = parse_text_config(config_json)
        multimodal = config_json.get("model_type") == "llama4"
        layout = MULTIMODAL if multimodal else TEXT_ONLY
        dtype = _DTYPE_NAMES.get(config.torch_dtype, "BF16")
        shapes = expected_text_shapes(config, layout)
        if multimodal and isinstance(config_json.get("vision_config"), dict):
            shapes |= expected_vision_shapes(config_json["vision_config"], config.hidden_size)
        absent = directory / "(config only: no weights)"
        tensors = {name: TensorInfo(name, absent, dtype, shape, 0, 0) for name, shape in shapes.items()}
        return cls(directory, config_json, config, layout, tensors, [], weightless=True)

    # -- structure -----------------------------------------------------------------------

    def classify(self, name: str) -> KeyRole:
        return self.layout.classify(name)

    def validate_shapes(self) -> None:
        """Check every text tensor config.json implies is present with the implied shape.

        Quantized checkpoints (per-expert keys, packed weights) are checked by `verify`, not here.
        """
        for name, shape in expected_text_shapes(self.config, self.layout).items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.directory}: tensor {name!r} is missing (config.json implies it)")
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {name!r} has shape {list(info.shape)} but config.json implies {list(shape)}"
                )

    # -- reads ---------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r}") from None

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, as stored."""
        return read_tensor(self.info(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of a tensor, as stored."""
        return read_rows(self.info(name), start, stop)

    def read_expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One routed expert's (gate, up, down) as nn.Linear weights [out, in], in the stored dtype,
        read as that expert's rows of the fused tensors.

        gate and up are the two halves of `gate_up_proj[e]` ([D, 2F], gate first); down is
        `down_proj[e]` ([F, D]). Both are stored [in, out], hence the transposes.
        """
        width = self.config.intermediate_size
        gate_up = self.read_rows(self.layout.gate_up_key(layer), expert, expert + 1)[0]
        down = self.read_rows(self.layout.down_key(layer), expert, expert + 1)[0]
        return gate_up[:, :width].t().contiguous(), gate_up[:, width:].t().contiguous(), down.t().contiguous()

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype a tensor is stored in (from its header)."""
        return DTYPES[self.info(name).dtype]
