"""Bad input to `scoutq inspect`: one clear `error:` line naming the file or tensor, exit code 1.

Every case builds a tiny fixture with `build_tiny`, damages it in one specific way, runs the
CLI (in process through `main`, and a representative subset as a real subprocess) and checks:
exit code 1, stderr is exactly one line starting with `error:` that names the offending file
or tensor, no traceback anywhere, nothing on stdout, and no file under the test's directory
was created, removed or modified by the failed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from scoutq.checkpoint.layout import MULTIMODAL
from scoutq.cli.app import main
from scoutq.fixtures.random_presets import build_tiny

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The fused experts of layer 1: the tensor most damage is aimed at (multimodal layout).
GATE_UP_1 = MULTIMODAL.gate_up_key(1)
Q_PROJ_1 = MULTIMODAL.layer_key(1, "self_attn.q_proj.weight")


# -- running the CLI -------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int | str | None
    stdout: str
    stderr: str


def run_in_process(target: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    capsys.readouterr()  # drop anything printed while building the fixture
    with pytest.raises(SystemExit) as exited:
        main(["inspect", str(target)])
    captured = capsys.readouterr()
    return Run(exited.value.code, captured.out, captured.err)


def run_subprocess(target: Path) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in ("SCOUTQ_DEBUG", "FORCE_COLOR")}
    env["NO_COLOR"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "scoutq.cli.app", "inspect", str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(run: Run, names: list[str]) -> str:
    """Exit 1, exactly one `error:` line on stderr mentioning every string in `names`."""
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    assert run.code == 1, (run.code, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


Snapshot = dict[str, tuple[int, int, str] | None]


def snapshot(root: Path) -> Snapshot:
    """Every file and directory under root, with (size, mtime_ns, sha256) for files."""
    state: Snapshot = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            state[key] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            state[key] = None
    return state


# -- building and damaging fixtures ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCOUTQ_DEBUG", raising=False)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A fresh tiny multimodal checkpoint, sharded with an index."""
    return build_tiny(tmp_path / "ckpt", seed=0)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2))


def edit_text_config(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Apply `edit` to the text part of config.json (text_config of a multimodal save)."""
    path = ckpt / "config.json"
    config = read_json(path)
    edit(config.get("text_config", config))
    write_json(path, config)
    return path


def weight_map(ckpt: Path) -> dict[str, str]:
    return read_json(ckpt / INDEX)["weight_map"]


def edit_weight_map(ckpt: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    path = ckpt / INDEX
    index = read_json(path)
    edit(index["weight_map"])
    write_json(path, index)
    return path


def shard_of(ckpt: Path, tensor: str) -> Path:
    """The file holding `tensor`: its indexed shard, or model.safetensors of a single-file save."""
    return ckpt / weight_map(ckpt)[tensor] if (ckpt / INDEX).exists() else ckpt / SINGLE


def make_single_file(ckpt: Path) -> Path:
    """Merge every shard into one model.safetensors and drop the index."""
    shards = sorted(set(weight_map(ckpt).values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors |= load_file(ckpt / shard)
    save_file(tensors, ckpt / SINGLE, metadata={"format": "pt"})
    for shard in shards:
        (ckpt / shard).unlink()
    (ckpt / INDEX).unlink()
    return ckpt


def rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def header_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def replace_header(path: Path, header: Any) -> None:
    """Replace the JSON header by `header` (padded to 8 bytes), keeping the data buffer."""
    data = path.read_bytes()[8 + header_length(path) :]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def read_raw_header(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes()[8 : 8 + header_length(path)])


def edit_header(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Apply `edit` (in place; its return value is ignored) to the JSON header, keeping the data."""
    header = read_raw_header(path)
    edit(header)
    replace_header(path, header)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


# -- damage to one safetensors file (a shard, or the single model.safetensors) ---------------
# Each takes the file and returns what the error line must mention besides the file's path.

FileDamage = Callable[[Path], list[str]]


def cut_in_data(path: Path) -> list[str]:
    truncate(path, path.stat().st_size - 100)
    return ["truncated"]


def cut_in_header(path: Path) -> list[str]:
    truncate(path, 8 + header_length(path) // 2)
    return ["truncated"]


def cut_in_length_prefix(path: Path) -> list[str]:
    truncate(path, 5)
    return ["truncated"]


def emptied(path: Path) -> list[str]:
    truncate(path, 0)
    return ["truncated"]


def garbage(path: Path) -> list[str]:
    path.write_bytes(random.Random(1).randbytes(path.stat().st_size))
    return []


def length_prefix_past_end(path: Path) -> list[str]:
    overwrite(path, 0, struct.pack("<Q", path.stat().st_size))
    return ["header"]


def length_prefix_huge(path: Path) -> list[str]:
    overwrite(path, 0, struct.pack("<Q", 2**63))
    return ["header"]


def header_not_json(path: Path) -> list[str]:
    overwrite(path, 8, b"{not json" + b"x" * (header_length(path) - 9))
    return ["not valid JSON"]


def header_not_utf8(path: Path) -> list[str]:
    overwrite(path, 8, b"\xff\xfe" * (header_length(path) // 2))
    return ["header"]


def header_not_object(path: Path) -> list[str]:
    replace_header(path, list(read_raw_header(path)))
    return ["not a JSON object"]


def header_deeply_nested(path: Path) -> list[str]:
    text = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    return ["header"]


def metadata_not_object(path: Path) -> list[str]:
    edit_header(path, lambda header: header.update({"__metadata__": ["format", "pt"]}))
    return ["__metadata__"]


def _first_tensor(path: Path) -> str:
    return next(name for name in read_raw_header(path) if name != "__metadata__")


def entry_without_offsets(path: Path) -> list[str]:
    name = _first_tensor(path)
    edit_header(path, lambda header: header[name].pop("data_offsets"))
    return [name]


def entry_not_object(path: Path) -> list[str]:
    name = _first_tensor(path)
    edit_header(path, lambda header: header.update({name: "BF16"}))
    return [name]


def entry_unknown_dtype(path: Path) -> list[str]:
    name = _first_tensor(path)
    edit_header(path, lambda header: header[name].update(dtype="Q4_K"))
    return [name, "Q4_K"]


def entry_dtype_not_string(path: Path) -> list[str]:
    name = _first_tensor(path)
    edit_header(path, lambda header: header[name].update(dtype=["BF16"]))
    return [name]


def entry_shape_infinite(path: Path) -> list[str]:
    name = _first_tensor(path)
    edit_header(path, lambda header: header[name].update(shape=[float("inf")]))
    return [name]


def entry_negative_shape(path: Path) -> list[str]:
    def edit(header: dict[str, Any]) -> None:
        entry = header[name]
        begin, end = entry["data_offsets"]
        # [-1, -n] has the right element count and byte size, so only the sign is wrong.
        entry["shape"] = [-1, -((end - begin) // 2)]

    name = _first_tensor(path)
    edit_header(path, edit)
    return [name, "negative"]


def entry_offsets_disagree_with_shape(path: Path) -> list[str]:
    name = _first_tensor(path)
    edit_header(path, lambda header: header[name].update(data_offsets=[0, 2]))
    return [name, "offsets"]


def entry_ends_past_data(path: Path) -> list[str]:
    def edit(header: dict[str, Any]) -> None:
        begin, end = header[name]["data_offsets"]
        shift = path.stat().st_size  # well past the end of the data buffer
        header[name]["data_offsets"] = [begin + shift, end + shift]

    name = _first_tensor(path)
    edit_header(path, edit)
    return [name, "truncated"]


FILE_DAMAGES: dict[str, FileDamage] = {
    "cut-in-data": cut_in_data,
    "cut-in-header": cut_in_header,
    "cut-in-length-prefix": cut_in_length_prefix,
    "empty-file": emptied,
    "garbage-bytes": garbage,
    "length-prefix-past-end": length_prefix_past_end,
    "length-prefix-huge": length_prefix_huge,
    "header-not-json": header_not_json,
    "header-not-utf8": header_not_utf8,
    "header-not-object": header_not_object,
    "header-deeply-nested": header_deeply_nested,
    "metadata-not-object": metadata_not_object,
    "entry-without-offsets": entry_without_offsets,
    "entry-not-object": entry_not_object,
    "entry-unknown-dtype": entry_unknown_dtype,
    "entry-dtype-not-string": entry_dtype_not_string,
    "entry-shape-infinite": entry_shape_infinite,
    "entry-negative-shape": entry_negative_shape,
    "entry-offsets-disagree-with-shape": entry_offsets_disagree_with_shape,
    "entry-ends-past-data": entry_ends_past_data,
}


# -- damage to the checkpoint directory ------------------------------------------------------
# Each takes the fixture directory and returns (the path to inspect, what the error must name).

DirDamage = Callable[[Path], tuple[Path, list[str]]]


def missing_directory(ckpt: Path) -> tuple[Path, list[str]]:
    target = ckpt.parent / "no-such-checkpoint"
    return target, [str(target), "no such directory"]


def missing_directory_with_brackets(ckpt: Path) -> tuple[Path, list[str]]:
    # Brackets must reach the terminal verbatim, not be read as rich markup ('[/]' used to crash).
    target = ckpt.parent / "ckpt[/][bold]x"
    return target, [str(target)]


def path_is_a_file(ckpt: Path) -> tuple[Path, list[str]]:
    target = ckpt / "config.json"
    return target, [str(target), "not a directory"]


def missing_config(ckpt: Path) -> tuple[Path, list[str]]:
    (ckpt / "config.json").unlink()
    return ckpt, [str(ckpt / "config.json")]


def config_not_json(ckpt: Path) -> tuple[Path, list[str]]:
    (ckpt / "config.json").write_text('{"model_type": "llama4",')
    return ckpt, [str(ckpt / "config.json"), "not valid JSON"]


def config_not_object(ckpt: Path) -> tuple[Path, list[str]]:
    (ckpt / "config.json").write_text("[1, 2, 3]")
    return ckpt, [str(ckpt / "config.json")]


def unsupported_model_type(ckpt: Path) -> tuple[Path, list[str]]:
    path = ckpt / "config.json"
    write_json(path, read_json(path) | {"model_type": "llama"})
    return ckpt, ["config.json", "model_type", "'llama'"]


def multimodal_without_text_config(ckpt: Path) -> tuple[Path, list[str]]:
    path = ckpt / "config.json"
    config = read_json(path)
    del config["text_config"]
    write_json(path, config)
    return ckpt, ["config.json", "text_config"]


def temperature_tuning_string(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text.update(attn_temperature_tuning="yes"))
    return ckpt, ["config.json", "attn_temperature_tuning", "'yes'"]


def vocab_size_string(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text.update(vocab_size="big"))
    return ckpt, ["config.json", "'big'"]


def zero_attention_heads(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text.update(num_attention_heads=0, head_dim=None))
    return ckpt, ["config.json", "num_attention_heads"]


def no_rope_layers_not_a_list(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text.update(no_rope_layers=5))
    return ckpt, ["config.json"]


def rope_factor_not_a_number(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text["rope_parameters"].update(factor="sixteen"))
    return ckpt, ["config.json", "'sixteen'"]


def unsupported_rope_type(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text["rope_parameters"].update(rope_type="yarn"))
    return ckpt, ["config.json", "'yarn'"]


def no_weights_at_all(ckpt: Path) -> tuple[Path, list[str]]:
    for shard in set(weight_map(ckpt).values()):
        (ckpt / shard).unlink()
    (ckpt / INDEX).unlink()
    return ckpt, [str(ckpt), INDEX, SINGLE]


def shard_missing(ckpt: Path) -> tuple[Path, list[str]]:
    shard = shard_of(ckpt, GATE_UP_1)
    shard.unlink()
    return ckpt, [str(shard), "missing"]


def index_not_json(ckpt: Path) -> tuple[Path, list[str]]:
    (ckpt / INDEX).write_text('{"weight_map": {')
    return ckpt, [str(ckpt / INDEX), "not valid JSON"]


def index_without_weight_map(ckpt: Path) -> tuple[Path, list[str]]:
    write_json(ckpt / INDEX, {"metadata": {"total_size": 1}})
    return ckpt, [str(ckpt / INDEX), "weight_map"]


def index_is_a_list(ckpt: Path) -> tuple[Path, list[str]]:
    write_json(ckpt / INDEX, list(weight_map(ckpt).items()))
    return ckpt, [str(ckpt / INDEX), "weight_map"]


def index_shard_name_not_a_string(ckpt: Path) -> tuple[Path, list[str]]:
    edit_weight_map(ckpt, lambda wm: wm.update({GATE_UP_1: 3}))  # type: ignore[dict-item]
    return ckpt, [str(ckpt / INDEX), "invalid shard file name 3"]


def _outside_copy(ckpt: Path) -> Path:
    """A perfectly valid shard just outside the checkpoint directory, so only its location is wrong."""
    outside = ckpt.parent / "outside.safetensors"
    shutil.copyfile(shard_of(ckpt, GATE_UP_1), outside)
    return outside


def index_relative_traversal(ckpt: Path) -> tuple[Path, list[str]]:
    _outside_copy(ckpt)
    edit_weight_map(ckpt, lambda wm: wm.update({GATE_UP_1: "../outside.safetensors"}))
    return ckpt, [str(ckpt / INDEX), "../outside.safetensors", "outside"]


def index_hidden_traversal(ckpt: Path) -> tuple[Path, list[str]]:
    _outside_copy(ckpt)
    name = f"{shard_of(ckpt, GATE_UP_1).name}/../../outside.safetensors"
    edit_weight_map(ckpt, lambda wm: wm.update({GATE_UP_1: name}))
    return ckpt, [str(ckpt / INDEX), name]


def index_absolute_path(ckpt: Path) -> tuple[Path, list[str]]:
    outside = _outside_copy(ckpt)
    edit_weight_map(ckpt, lambda wm: wm.update({GATE_UP_1: str(outside)}))
    return ckpt, [str(ckpt / INDEX), str(outside), "outside"]


def index_symlink_out(ckpt: Path) -> tuple[Path, list[str]]:
    outside = _outside_copy(ckpt)
    (ckpt / "link.safetensors").symlink_to(outside)
    edit_weight_map(ckpt, lambda wm: wm.update({GATE_UP_1: "link.safetensors"}))
    return ckpt, [str(ckpt / INDEX), "link.safetensors", "outside"]


def index_tensor_not_in_shard(ckpt: Path) -> tuple[Path, list[str]]:
    wrong = next(shard for shard in sorted(set(weight_map(ckpt).values())) if shard != weight_map(ckpt)[GATE_UP_1])
    edit_weight_map(ckpt, lambda wm: wm.update({GATE_UP_1: wrong}))
    return ckpt, [str(ckpt / wrong), GATE_UP_1]


def index_names_unknown_tensor(ckpt: Path) -> tuple[Path, list[str]]:
    shard = shard_of(ckpt, GATE_UP_1)
    edit_weight_map(ckpt, lambda wm: wm.update({"language_model.model.layers.9.extra.weight": shard.name}))
    return ckpt, [str(shard), "language_model.model.layers.9.extra.weight"]


def tensor_wrong_shape(ckpt: Path) -> tuple[Path, list[str]]:
    shard = shard_of(ckpt, Q_PROJ_1)
    rewrite_tensors(shard, lambda tensors: tensors.update({Q_PROJ_1: torch.zeros(32, 64, dtype=torch.bfloat16)}))
    return ckpt, [str(shard), Q_PROJ_1, "[32, 64]", "[128, 128]"]


def experts_wrong_count(ckpt: Path) -> tuple[Path, list[str]]:
    shard = shard_of(ckpt, GATE_UP_1)
    rewrite_tensors(shard, lambda tensors: tensors.update({GATE_UP_1: tensors[GATE_UP_1][:3].clone()}))
    return ckpt, [str(shard), GATE_UP_1, "[3, 128, 512]", "[4, 128, 512]"]


def config_hidden_size_changed(ckpt: Path) -> tuple[Path, list[str]]:
    edit_text_config(ckpt, lambda text: text.update(hidden_size=32))
    embed = MULTIMODAL.embed_key
    return ckpt, [str(shard_of(ckpt, embed)), embed, "[512, 128]", "[512, 32]"]


def config_more_layers(ckpt: Path) -> tuple[Path, list[str]]:
    def edit(text: dict[str, Any]) -> None:
        text.update(num_hidden_layers=5, moe_layers=[0, 1, 2, 3, 4])
        text["no_rope_layers"].append(1)
        text["layer_types"].append("chunked_attention")

    edit_text_config(ckpt, edit)
    return ckpt, [str(ckpt), "language_model.model.layers.4.", "missing"]


def tensor_missing(ckpt: Path) -> tuple[Path, list[str]]:
    shard = shard_of(ckpt, Q_PROJ_1)
    rewrite_tensors(shard, lambda tensors: tensors.pop(Q_PROJ_1))
    edit_weight_map(ckpt, lambda wm: wm.pop(Q_PROJ_1))
    return ckpt, [str(ckpt), Q_PROJ_1, "missing"]


DIR_DAMAGES: dict[str, DirDamage] = {
    "missing-directory": missing_directory,
    "missing-directory-with-brackets": missing_directory_with_brackets,
    "path-is-a-file": path_is_a_file,
    "missing-config": missing_config,
    "config-not-json": config_not_json,
    "config-not-object": config_not_object,
    "unsupported-model-type": unsupported_model_type,
    "multimodal-without-text-config": multimodal_without_text_config,
    "attn-temperature-tuning-string": temperature_tuning_string,
    "vocab-size-string": vocab_size_string,
    "zero-attention-heads": zero_attention_heads,
    "no-rope-layers-not-a-list": no_rope_layers_not_a_list,
    "rope-factor-not-a-number": rope_factor_not_a_number,
    "unsupported-rope-type": unsupported_rope_type,
    "no-weights-at-all": no_weights_at_all,
    "shard-missing": shard_missing,
    "index-not-json": index_not_json,
    "index-without-weight-map": index_without_weight_map,
    "index-is-a-list": index_is_a_list,
    "index-shard-name-not-a-string": index_shard_name_not_a_string,
    "index-relative-traversal": index_relative_traversal,
    "index-hidden-traversal": index_hidden_traversal,
    "index-absolute-path": index_absolute_path,
    "index-symlink-out": index_symlink_out,
    "index-tensor-not-in-shard": index_tensor_not_in_shard,
    "index-names-unknown-tensor": index_names_unknown_tensor,
    "tensor-wrong-shape": tensor_wrong_shape,
    "experts-wrong-count": experts_wrong_count,
    "config-hidden-size-changed": config_hidden_size_changed,
    "config-more-layers": config_more_layers,
    "tensor-missing": tensor_missing,
}


def damage_file(ckpt: Path, layout: str, damage: FileDamage) -> tuple[Path, list[str]]:
    """Damage the file holding layer 1's experts, in a sharded or single-file checkpoint."""
    if layout == "single":
        make_single_file(ckpt)
    path = shard_of(ckpt, GATE_UP_1)
    return ckpt, [str(path), *damage(path)]


# -- tests -----------------------------------------------------------------------------------


def test_undamaged_fixture_inspects_cleanly(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The baseline every damaged case starts from: exit 0, JSON on stdout, nothing on stderr."""
    with pytest.raises(SystemExit) as exited:  # typer exits even on success
        main(["inspect", str(ckpt), "--json"])
    assert exited.value.code in (0, None)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["tensors"] == 77


@pytest.mark.parametrize("damage", DIR_DAMAGES.values(), ids=DIR_DAMAGES.keys())
def test_damaged_checkpoint(
    damage: DirDamage, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, names = damage(ckpt)
    before = snapshot(tmp_path)
    assert_one_line_error(run_in_process(target, capsys), names)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["sharded", "single"])
@pytest.mark.parametrize("damage", FILE_DAMAGES.values(), ids=FILE_DAMAGES.keys())
def test_damaged_safetensors_file(
    damage: FileDamage, layout: str, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, names = damage_file(ckpt, layout, damage)
    before = snapshot(tmp_path)
    assert_one_line_error(run_in_process(target, capsys), names)
    assert snapshot(tmp_path) == before


SUBPROCESS_CASES = [
    "missing-directory",
    "unsupported-model-type",
    "index-relative-traversal",
    "tensor-wrong-shape",
    "cut-in-data",
    "garbage-bytes",
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_damaged_checkpoint_subprocess(case: str, ckpt: Path, tmp_path: Path) -> None:
    """The same guarantees through a real interpreter: the console entry point, real stderr."""
    if case in DIR_DAMAGES:
        target, names = DIR_DAMAGES[case](ckpt)
    else:
        target, names = damage_file(ckpt, "sharded", FILE_DAMAGES[case])
    before = snapshot(tmp_path)
    assert_one_line_error(run_subprocess(target), names)
    assert snapshot(tmp_path) == before


def test_debug_env_shows_traceback(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SCOUTQ_DEBUG=1 re-raises the typed error instead of printing one line (for developers)."""
    from scoutq.errors import ScoutqError

    monkeypatch.setenv("SCOUTQ_DEBUG", "1")
    with pytest.raises(ScoutqError, match="no such directory"):
        main(["inspect", str(ckpt.parent / "absent")])
