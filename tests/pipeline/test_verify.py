"""`scoutq verify`: good quantized outputs pass; each kind of damage is one `error:` line, exit 1.

The tiny fixture is quantized once per recipe (module scope); every damage test copies one
output into its own directory first. Damage below the hash check (a zero or NaN scale, a wrong
weight_shape, a missing tensor, a wrong dtype, an edited config.json) rewrites the file and
then records its new sha256 in the manifest, so that the deeper check is the one that fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli as run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scoutq.checkpoint.layout import MULTIMODAL
from scoutq.cli.app import main
from scoutq.pipeline.verify import target_matches, verify_output

RECIPES = ["w4a16-g128", "w4a16-g128-asym", "w8a16", "mixed"]
MANIFEST = "scoutq-manifest.json"
EXPERT = MULTIMODAL.layer_key(1, "feed_forward.experts.2.down_proj")
SHARED = MULTIMODAL.layer_key(0, "feed_forward.shared_expert.up_proj")


@pytest.fixture(scope="module")
def outputs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One quantized output per recipe, plus a many-shard w4a16-g128. Treat as read-only."""
    root = tmp_path_factory.mktemp("quantized")
    built = {}
    for recipe, extra in [(r, []) for r in RECIPES] + [("sharded", ["--max-shard-size", "300KB"])]:
        out = root / recipe
        try:
            main(["quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128" if recipe == "sharded" else recipe,
                  "--out", str(out), *extra])
        except SystemExit as done:
            assert done.code in (0, None)
        built[recipe] = out
    assert len(list(built["sharded"].glob("*.safetensors"))) > 2
    return built


@pytest.fixture
def copy_of(outputs: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    def make(recipe: str) -> Path:
        return Path(shutil.copytree(outputs[recipe], tmp_path / recipe))

    return make


def rehash(out: Path, name: str) -> None:
    """Record a modified file's new sha256 in the manifest, so the hash check passes."""
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def shard_of(out: Path, tensor: str) -> Path:
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return out / json.loads(index.read_text())["weight_map"][tensor]
    return out / "model.safetensors"


def rewrite(out: Path, tensor: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite the shard holding `tensor` with `change` applied, and rehash it."""
    shard = shard_of(out, tensor)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    rehash(out, shard.name)
    return shard


def assert_fails(out: Path, capsys: pytest.CaptureFixture[str], *names: str) -> str:
    code, stdout, stderr = run(["verify", str(out)], capsys)
    assert "Traceback" not in stderr
    assert code == 1, stderr
    assert stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


# -- good outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [*RECIPES, "sharded"])
def test_good_output_verifies(recipe: str, outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run(["verify", str(outputs[recipe])], capsys)
    assert code == 0, stderr
    manifest = json.loads((outputs[recipe] / MANIFEST).read_text())
    files = len(manifest["files"])
    modules = manifest["quantized_modules"]
    assert stdout.startswith(f"ok: {files} files, ")
    assert stdout.rstrip().endswith(f"{modules} quantized modules verified")


def test_json_report_and_progress_hook(outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = outputs["w4a16-g128-asym"]
    code, stdout, _ = run(["verify", str(out), "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    manifest = json.loads((out / MANIFEST).read_text())
    assert report["ok"] and report["files"] == len(manifest["files"])
    assert report["quantized_modules"] == manifest["quantized_modules"]
    assert report["bytes_hashed"] == sum((out / name).stat().st_size for name in manifest["files"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert report["tensors"] == len(list(handle.keys()))

    calls: list[tuple[int, int]] = []
    library = verify_output(out, on_progress=lambda n, total: calls.append((n, total)))
    assert calls[0] == (0, library.bytes_hashed)
    assert sum(n for n, _ in calls) == library.bytes_hashed == report["bytes_hashed"]


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(["verify", "--help"], capsys)
    assert code == 0 and "Examples" in stdout and "scoutq verify" in stdout


def test_target_matching_semantics() -> None:
    name = "language_model.model.layers.3.feed_forward.experts.1.gate_proj"
    pattern = r"re:^(language_model\.model|model)\.layers\.\d+\.feed_forward\.experts\.\d+\.gate_proj$"
    assert target_matches(pattern, name)
    assert target_matches(r"re:.*experts", name)  # re.match: anchored at the start only
    assert not target_matches(r"re:experts", name)
    assert target_matches(name, name) and not target_matches(name + "x", name)
    assert not target_matches("language_model.model.layers.3", name)


# -- files against the manifest ------------------------------------------------------------------


def test_flipped_byte_in_shard_data(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("sharded")
    shard = sorted(out.glob("model-*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data, not the header
    shard.write_bytes(bytes(data))
    assert_fails(out, capsys, shard.name, "sha256")


def test_extra_unlisted_file(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128")
    (out / "notes.txt").write_text("hello\n")
    assert_fails(out, capsys, "notes.txt", "not listed")


def test_deleted_file(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("sharded")
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    assert_fails(out, capsys, victim.name, "missing")


def test_manifest_not_json(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128")
    (out / MANIFEST).write_text("{not json")
    assert_fails(out, capsys, MANIFEST, "not valid JSON")


def test_missing_manifest(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128")
    (out / MANIFEST).unlink()
    assert_fails(out, capsys, MANIFEST, "missing")


def test_config_edited_fails_the_hash(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128")
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["hidden_size"] = 256
    (out / "config.json").write_text(json.dumps(config, indent=2))
    assert_fails(out, capsys, "config.json", "sha256")


# -- config and tensors ----------------------------------------------------------------------------


def test_config_shape_mismatch(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128")
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["hidden_size"] = 256
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rehash(out, "config.json")
    line = assert_fails(out, capsys, "model.safetensors", MULTIMODAL.embed_key, "shape")
    assert "[512, 128]" in line and "[512, 256]" in line


def test_config_not_compressed(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w8a16")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quantization_status"] = "frozen"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rehash(out, "config.json")
    assert_fails(out, capsys, "config.json", "quantization_status")


@pytest.mark.parametrize("value", [0.0, float("nan")], ids=["zero", "nan"])
def test_bad_scale(value: float, copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128")
    name = f"{EXPERT}.weight_scale"

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][5, 1] = value

    shard = rewrite(out, name, damage)
    line = assert_fails(out, capsys, shard.name, name, "scale")
    assert "row 5, group 1" in line


def test_wrong_weight_shape_values(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w8a16")
    name = f"{SHARED}.weight_shape"

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.tensor([256, 64], dtype=torch.int64)

    shard = rewrite(out, name, damage)
    assert_fails(out, capsys, shard.name, name, "[256, 64]", "[256, 128]")


def test_missing_zero_point(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("w4a16-g128-asym")
    name = f"{EXPERT}.weight_zero_point"
    rewrite(out, name, lambda tensors: tensors.pop(name))
    assert_fails(out, capsys, name, "missing", "asym")


def test_unexpected_zero_point_for_symmetric(
    copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of("w4a16-g128")
    name = f"{EXPERT}.weight_zero_point"

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros((16, 2), dtype=torch.int32)

    shard = rewrite(out, name, damage)
    assert_fails(out, capsys, shard.name, name, "unexpected")


def test_wrong_dtype(copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of("mixed")
    name = f"{SHARED}.weight_scale"

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].float()

    shard = rewrite(out, name, damage)
    assert_fails(out, capsys, shard.name, name, "F32", "BF16")


def test_quantized_module_stored_unquantized(
    copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of("w4a16-g128")

    def damage(tensors: dict[str, torch.Tensor]) -> None:
        for suffix in ("weight_packed", "weight_scale", "weight_shape"):
            tensors.pop(f"{EXPERT}.{suffix}")
        tensors[f"{EXPERT}.weight"] = torch.zeros((128, 256), dtype=torch.bfloat16)

    rewrite(out, f"{EXPERT}.weight_packed", damage)
    assert_fails(out, capsys, EXPERT, "unquantized", "group_0")
