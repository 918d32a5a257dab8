"""`Checkpoint` reads both Hugging Face layouts, and `parse_text_config` normalises config quirks.

* both layouts (multimodal and text-only, sharded and single-file) open and validate, and
  every key classifies to a known role;
* `read_expert` is exactly the transposed slice of the fused expert tensors, for every layer,
  expert and projection, and reads only that expert's bytes (the other experts are overwritten
  with NaN bit patterns on disk and the read is still exact and finite);
* config.json quirks: integer `attn_temperature_tuning`, transformers 4.x vs 5.x RoPE keys,
  missing `no_rope_layers`, `moe_layers` and `head_dim`.
"""

from __future__ import annotations

import copy
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from scoutq.checkpoint.config import RopeConfig, TextConfig, parse_text_config
from scoutq.checkpoint.layout import Role
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.safetensors_io import TensorInfo, read_header
from scoutq.errors import CheckpointError
from scoutq.fixtures import presets
from scoutq.fixtures.random_presets import build_tiny

INDEX = "model.safetensors.index.json"
PROJS = ("gate", "up", "down")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """One pristine tiny checkpoint per layout (text_only False/True), shared read-only."""
    root = tmp_path_factory.mktemp("reader")
    return {flag: build_tiny(root / f"tiny-{flag}", seed=3, text_only=flag) for flag in (False, True)}


def make_single_file(directory: Path) -> None:
    """Merge the shards of `directory` into one model.safetensors and remove the index."""
    shards = sorted(directory.glob("model-*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors |= load_file(shard)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for shard in shards:
        shard.unlink()
    (directory / INDEX).unlink()


def copy_checkpoint(source: Path, destination: Path, single_file: bool) -> Path:
    shutil.copytree(source, destination)
    if single_file:
        make_single_file(destination)
    return destination


# -- opening both layouts --------------------------------------------------------------------


@pytest.mark.parametrize("single_file", [False, True], ids=["sharded", "single-file"])
@pytest.mark.parametrize("text_only", [False, True], ids=["multimodal", "text-only"])
def test_both_layouts_open_and_classify(
    built: dict[bool, Path], tmp_path: Path, text_only: bool, single_file: bool
) -> None:
    directory = copy_checkpoint(built[text_only], tmp_path / "ckpt", single_file)
    ckpt = Checkpoint.open(directory)
    ckpt.validate_shapes()

    assert ckpt.layout.name == ("text" if text_only else "multimodal")
    assert (len(ckpt.shard_files) == 1) == single_file
    assert all(info.file in ckpt.shard_files for info in ckpt.tensors.values())
    roles = {name: ckpt.classify(name) for name in ckpt.tensors}
    unknown = [name for name, role in roles.items() if role.role is Role.UNKNOWN]
    assert unknown == []

    config = ckpt.config
    fused = {name for name, role in roles.items() if role.role in (Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN)}
    assert len(fused) == 2 * len(config.moe_layers)
    vision = [name for name, role in roles.items() if role.role in (Role.VISION, Role.PROJECTOR)]
    assert (vision == []) == text_only
    if text_only:
        assert all(name.startswith(("model.", "lm_head.")) for name in ckpt.tensors)


@pytest.mark.parametrize("text_only", [False, True], ids=["multimodal", "text-only"])
def test_read_returns_stored_tensor(built: dict[bool, Path], text_only: bool) -> None:
    ckpt = Checkpoint.open(built[text_only])
    stored: dict[str, torch.Tensor] = {}
    for shard in ckpt.shard_files:
        stored |= load_file(shard)
    assert set(stored) == set(ckpt.tensors)
    for name, tensor in stored.items():
        assert ckpt.dtype(name) == tensor.dtype == torch.bfloat16
        assert torch.equal(ckpt.read(name), tensor), name
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        ckpt.read("nope")


# -- read_expert -----------------------------------------------------------------------------


@pytest.mark.parametrize("text_only", [False, True], ids=["multimodal", "text-only"])
def test_read_expert_is_transposed_slice_of_fused_tensor(built: dict[bool, Path], text_only: bool) -> None:
    ckpt = Checkpoint.open(built[text_only])
    config = ckpt.config
    d, f = config.hidden_size, config.intermediate_size
    assert config.moe_layers, "the fixture should have MoE layers"
    for layer in config.moe_layers:
        gate_up = ckpt.read(ckpt.layout.gate_up_key(layer))  # [E, D, 2F]
        down = ckpt.read(ckpt.layout.down_key(layer))  # [E, F, D]
        assert gate_up.shape == (config.num_local_experts, d, 2 * f)
        for expert in range(config.num_local_experts):
            expected = {
                "gate": gate_up[expert][:, :f].T,
                "up": gate_up[expert][:, f:].T,
                "down": down[expert].T,
            }
            for proj, got in zip(PROJS, ckpt.read_expert(layer, expert), strict=True):
                assert got.dtype == torch.bfloat16
                assert got.is_contiguous()
                assert got.shape == ((d, f) if proj == "down" else (f, d))
                assert torch.equal(got, expected[proj]), (layer, expert, proj)


def data_start(path: Path) -> int:
    """Byte offset of the data buffer: 8-byte length prefix plus the header."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def poison_other_experts(info: TensorInfo, keep: int, experts: int) -> None:
    """Overwrite every expert's bytes of a fused tensor except `keep` with 0xFF (NaN in bf16)."""
    per_expert = info.nbytes // experts
    start = data_start(info.file) + info.begin
    with open(info.file, "r+b") as handle:
        for expert in range(experts):
            if expert != keep:
                handle.seek(start + expert * per_expert)
                handle.write(b"\xff" * per_expert)


@pytest.mark.parametrize("single_file", [False, True], ids=["sharded", "single-file"])
@pytest.mark.parametrize("expert", [0, 2, 3])
def test_read_expert_reads_only_its_slice(
    built: dict[bool, Path], tmp_path: Path, expert: int, single_file: bool
) -> None:
    directory = copy_checkpoint(built[False], tmp_path / "ckpt", single_file)
    original = Checkpoint.open(directory)
    config, layout = original.config, original.layout
    layer = config.moe_layers[-1]
    wanted = dict(zip(PROJS, original.read_expert(layer, expert), strict=True))

    for name in (layout.gate_up_key(layer), layout.down_key(layer)):
        headers, _ = read_header(original.info(name).file)
        poison_other_experts(headers[name], expert, config.num_local_experts)

    poisoned = Checkpoint.open(directory)  # nothing cached from before
    for proj, got in zip(PROJS, poisoned.read_expert(layer, expert), strict=True):
        assert torch.isfinite(got.float()).all(), proj
        assert torch.equal(got, wanted[proj]), proj
    # The poison is really there: a neighbouring expert and the whole tensor read as NaN.
    neighbour = (expert + 1) % config.num_local_experts
    assert torch.isnan(poisoned.read_expert(layer, neighbour)[0].float()).all()
    assert torch.isnan(poisoned.read(layout.down_key(layer)).float()).any()


# -- config.json quirks ----------------------------------------------------------------------


def tiny_text(**changes: Any) -> dict[str, Any]:
    """The tiny preset's text-only config.json, with keys changed (a value of None removes it)."""
    config = presets.text_only_config(presets.tiny_text_config(512))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return copy.deepcopy(config)


def test_preset_parses_as_written() -> None:
    config = parse_text_config(tiny_text())
    assert config.attn_temperature_tuning is True
    assert config.use_rope == (True, True, True, False)
    assert config.chunked_attention == (True, True, True, False)
    assert config.moe_layers == (0, 1, 2, 3)
    assert config.head_dim == 32
    assert config.rope == RopeConfig(500000.0, "llama3", 16.0, 1.0, 1.0, 8192)


@pytest.mark.parametrize(("stored", "expected"), [(4, True), (0, False), (True, True), (False, False)])
def test_attn_temperature_tuning_integer(stored: int | bool, expected: bool) -> None:
    """Older transformers saved attn_temperature_tuning as the integer 4, meaning on."""
    assert parse_text_config(tiny_text(attn_temperature_tuning=stored)).attn_temperature_tuning is expected


def test_rope_scaling_v4_equals_rope_parameters_v5() -> None:
    llama3 = dict(presets.SCOUT_ROPE)
    theta = llama3.pop("rope_theta")
    v5 = parse_text_config(tiny_text(rope_parameters=dict(presets.SCOUT_ROPE)))
    v4 = parse_text_config(tiny_text(rope_parameters=None, rope_scaling=llama3, rope_theta=theta))
    assert v4.rope == v5.rope == RopeConfig(500000.0, "llama3", 16.0, 1.0, 1.0, 8192)


def test_rope_v4_default_and_legacy_type_key() -> None:
    """rope_scaling null (no scaling) keeps the top-level theta; 4.x also spelled rope_type as `type`."""
    plain = parse_text_config(tiny_text(rope_parameters=None, rope_theta=10000.0))
    assert plain.rope == RopeConfig(10000.0)
    legacy = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    config = parse_text_config(tiny_text(rope_parameters=None, rope_scaling=legacy, rope_theta=500000.0))
    assert config.rope == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)


def test_missing_no_rope_layers_makes_every_fourth_layer_nope() -> None:
    config = parse_text_config(tiny_text(num_hidden_layers=8, moe_layers=None, no_rope_layers=None, layer_types=None))
    assert config.use_rope == (True, True, True, False, True, True, True, False)
    assert config.chunked_attention == config.use_rope  # NoPE layers attend to the whole prefix
    empty = parse_text_config(tiny_text(num_hidden_layers=8, moe_layers=None, no_rope_layers=[], layer_types=None))
    assert empty.use_rope == config.use_rope  # transformers treats [] like a missing key


def test_missing_moe_layers_follow_interleave_step() -> None:
    config = parse_text_config(tiny_text(num_hidden_layers=8, moe_layers=None, interleave_moe_layer_step=2,
                                         no_rope_layers=None, layer_types=None))
    assert config.moe_layers == (1, 3, 5, 7)
    assert [config.is_moe_layer(i) for i in range(8)] == [i % 2 == 1 for i in range(8)]
    every = parse_text_config(tiny_text(moe_layers=None, interleave_moe_layer_step=None))
    assert every.moe_layers == (0, 1, 2, 3)  # the default step is 1: every layer is MoE


@pytest.mark.parametrize("head_dim", [None, 0], ids=["missing", "zero"])
def test_missing_head_dim_is_hidden_over_heads(head_dim: int | None) -> None:
    changes: dict[str, Any] = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2}
    config = tiny_text(**changes, head_dim=None)
    if head_dim is not None:
        config["head_dim"] = head_dim
    assert parse_text_config(config).head_dim == 8


def test_multimodal_config_reads_text_config() -> None:
    text = presets.tiny_text_config(512)
    multimodal = presets.multimodal_config(text, presets.tiny_vision_config())
    parsed: TextConfig = parse_text_config(multimodal)
    assert parsed == parse_text_config(presets.text_only_config(text))
