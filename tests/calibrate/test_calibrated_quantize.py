"""Calibrated quantization end to end: the layer walk, coverage, resume, reproducibility, errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.models import resident_trace
from safetensors.torch import load_file

from scoutq.calibrate.job import COVERAGE_NAME, FAULT_ENV
from scoutq.calibrate.quantizer import CalibratingClient, CalibrationSettings
from scoutq.checkpoint.manifest import MANIFEST_NAME
from scoutq.checkpoint.reader import Checkpoint
from scoutq.data.sets import calibration_batch, load_calibration_set
from scoutq.evaluate.compare import compare_models
from scoutq.evaluate.windows import evaluation_windows
from scoutq.model.load import load_model
from scoutq.quant import primitives
from scoutq.quant.packed import PackedWeight
from scoutq.quant.plan import build_plan
from scoutq.quant.recipe import Recipe
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme
from scoutq.stream.walk import LayerStream

SMALL = ["--samples", "16", "--seq-len", "64"]  # enough tokens for every expert, fast


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def quantize(capsys: pytest.CaptureFixture[str], src: Path, dst: Path, recipe: str, *extra: str
             ) -> tuple[int, str, str]:
    return run_cli(["quantize", str(src), "--recipe", recipe, "--out", str(dst), *extra], capsys)


@pytest.fixture(scope="module")
def gptq_output(tiny_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("calibrated") / "gptq"
    from scoutq.cli.app import main

    try:
        main(["quantize", str(tiny_trained), "--recipe", "w4a16-g128-gptq", "--out", str(dst), *SMALL])
    except SystemExit as done:
        assert done.code in (0, None)
    return dst


def test_calibrated_output_verifies_and_records_coverage(
    gptq_output: Path, tiny_trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["verify", str(gptq_output)], capsys)
    assert code == 0, err
    coverage = json.loads((gptq_output / COVERAGE_NAME).read_text())
    manifest = json.loads((gptq_output / MANIFEST_NAME).read_text())
    assert COVERAGE_NAME in manifest["files"]
    assert manifest["calibration"]["samples"] == 16 and manifest["calibration"]["seq_len"] == 64
    assert manifest["recipe"]["calibration"]["samples"] == 16  # the command-line override is recorded
    assert manifest["signed_scales"] is True  # w4a16-g128-gptq: a consumer reading scales as unsigned must know
    stored = [load_file(str(shard)) for shard in gptq_output.glob("*.safetensors")]
    assert any(bool((t < 0).any()) for tensors in stored for name, t in tensors.items() if name.endswith("weight_scale"))
    config = Checkpoint.open(tiny_trained).config
    assert [entry["layer"] for entry in coverage["layers"]] == list(range(config.num_hidden_layers))
    for entry in coverage["layers"]:
        assert entry["tokens"] == 16 * 64
        assert [e["expert"] for e in entry["experts"]] == list(range(config.num_local_experts))
        # Every token goes to exactly top_k experts.
        assert sum(e["routed_tokens"] for e in entry["experts"]) == entry["tokens"] * config.num_experts_per_tok
        for e in entry["experts"]:
            assert e["policy"] in ("routed", "all_experts_fallback")
            expected = e["routed_tokens"] if e["policy"] == "routed" else entry["tokens"]
            assert e["statistics_tokens"] == expected
    assert not (gptq_output / ".scoutq-calibration").exists()


@pytest.mark.parametrize("fp_target", [False, True], ids=["gptq", "gptq-fp-target"])
def test_walk_runs_the_model_math_and_counts_what_the_router_chose(tiny_trained: Path, fp_target: bool) -> None:
    # Quantize only the last layer's experts: the walk must then carry exactly the model's own
    # hidden states through the layers before it, and see exactly the model's routing. With
    # fp_target the reference stream must be the model's own hidden states at every layer.
    checkpoint = Checkpoint.open(tiny_trained)
    config = checkpoint.config
    last = config.num_hidden_layers - 1
    recipe = Recipe.model_validate({
        "name": "last", "method": "gptq",
        "rules": [{"targets": [f"re:.*layers\\.{last}\\.feed_forward\\.experts\\..*"],
                   "weights": {"bits": 4, "group_size": 128}}],
        "gptq": {"fp_target": fp_target}})
    batch = calibration_batch(load_calibration_set("builtin"), tiny_trained, samples=4, seq_len=48, seed=3)
    stream = LayerStream(checkpoint)
    walk = CalibratingClient(stream, build_plan(checkpoint, recipe), CalibrationSettings.from_recipe(recipe))

    captured, routers, _ = resident_trace(tiny_trained, batch.tokens)

    hidden = stream.start(batch.tokens)
    embedding = Checkpoint.open(tiny_trained).read(checkpoint.layout.embed_key).float()
    assert torch.equal(hidden.main, embedding[batch.tokens])
    assert (hidden.reference is not None) == fp_target
    for layer in range(config.num_hidden_layers):
        hidden, result = walk.calibrate_layer(layer, hidden)
        chosen = torch.topk(routers[layer], config.num_experts_per_tok, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=config.num_local_experts).tolist()
        assert [e.routed_tokens for e in result.experts] == counts
        if hidden.reference is not None:
            torch.testing.assert_close(hidden.reference, captured[layer], rtol=1e-5, atol=1e-5)
        if layer < last:
            assert not result.quantized
            torch.testing.assert_close(hidden.main, captured[layer], rtol=1e-5, atol=1e-5)
            if hidden.reference is not None:  # nothing quantized yet: the two streams are one
                assert torch.equal(hidden.reference, hidden.main)
        else:
            assert len(result.quantized) == 3 * config.num_local_experts
            if hidden.reference is not None:
                assert not torch.equal(hidden.reference, hidden.main)


def _walk_first_layer(checkpoint: Checkpoint, layer: int, router_weight: float, tokens: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, PackedWeight]]:
    recipe = Recipe.model_validate({
        "name": "one-layer", "method": "gptq",
        "rules": [{"targets": [f"re:.*layers\\.{layer}\\.feed_forward\\.(experts|shared_expert)\\..*"],
                   "weights": {"bits": 4, "group_size": 128}}],
        "gptq": {"act_order": True, "router_weight": router_weight}})
    stream = LayerStream(checkpoint)
    walk = CalibratingClient(stream, build_plan(checkpoint, recipe), CalibrationSettings.from_recipe(recipe))
    hidden = stream.start(tokens)
    quantized: dict[str, PackedWeight] = {}
    for index in range(layer + 1):
        hidden, result = walk.calibrate_layer(index, hidden)
        quantized.update(result.quantized)
    return hidden.main, quantized


def test_router_aware_rounding_cuts_the_noise_later_routers_read(tiny_trained: Path) -> None:
    # Layer 0's experts quantized with and without router_weight: the down_proj rounding changes
    # (gate and up do not), and the error the quantized layer leaves in the residual stream
    # projects less onto the later routers' directions. The last layer has no later router, so
    # there the option changes nothing.
    checkpoint = Checkpoint.open(tiny_trained)
    config = checkpoint.config
    tokens = calibration_batch(load_calibration_set("builtin"), tiny_trained, samples=8, seq_len=64, seed=5).tokens
    model = load_model(tiny_trained, dtype=torch.float32)
    captured: list[torch.Tensor] = []
    hook = model.layers[0].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.inference_mode():
        model(tokens)
    hook.remove()

    plain_hidden, plain = _walk_first_layer(checkpoint, 0, 0.0, tokens)
    aware_hidden, aware = _walk_first_layer(checkpoint, 0, 10.0, tokens)
    assert plain.keys() == aware.keys()
    for name in plain:
        same = torch.equal(plain[name].packed, aware[name].packed)
        assert same == (not name.endswith("down_proj")), name

    read = checkpoint.read
    directions = []
    for layer in range(1, config.num_hidden_layers):
        router = read(checkpoint.layout.layer_key(layer, "feed_forward.router.weight")).float()
        norm = read(checkpoint.layout.layer_key(layer, "post_attention_layernorm.weight")).float()
        directions.append((router - router.mean(0, keepdim=True)) * norm)
    along = torch.cat(directions)

    def router_noise(hidden: torch.Tensor) -> float:
        return float(((hidden - captured[0]).reshape(-1, along.shape[1]) @ along.t()).square().sum())

    # Measured at writing: 0.62x the router noise, 1.04x the total residual error.
    assert router_noise(aware_hidden) < 0.8 * router_noise(plain_hidden), (router_noise(aware_hidden),
                                                                           router_noise(plain_hidden))
    last = config.num_hidden_layers - 1
    _, plain_last = _walk_first_layer(checkpoint, last, 0.0, tokens[:2])
    _, aware_last = _walk_first_layer(checkpoint, last, 10.0, tokens[:2])
    assert all(torch.equal(plain_last[name].packed, aware_last[name].packed) for name in plain_last)


def test_same_command_twice_gives_identical_bytes(
    gptq_output: Path, tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = quantize(capsys, tiny_trained, tmp_path / "again", "w4a16-g128-gptq", *SMALL)
    assert code == 0, err
    assert file_hashes(tmp_path / "again") == file_hashes(gptq_output)


@pytest.mark.parametrize("recipe", ["w4a16-g128-gptq", "w4a16-g128-gptaq"])
def test_killed_calibration_resumes_to_identical_output(
    recipe: str, gptq_output: Path, tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GPTAQ carries a second (reference) stream of hidden states: it must be resumed too.
    uninterrupted = gptq_output
    if recipe != "w4a16-g128-gptq":
        uninterrupted = tmp_path / "uninterrupted"
        code, _, err = quantize(capsys, tiny_trained, uninterrupted, recipe, *SMALL)
        assert code == 0, err
    dst = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: "2", "NO_COLOR": "1"}
    command = [sys.executable, "-m", "scoutq.cli.app", "quantize", str(tiny_trained), "--recipe", recipe,
               "--out", str(dst), *SMALL]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((dst / ".scoutq-calibration" / "state.json").read_text())
    assert state["next_layer"] == 2 and not (dst / MANIFEST_NAME).exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (dst / ".scoutq-calibration").glob("layer-*.safetensors")}
    assert sorted(finished) == ["layer-0000.safetensors", "layer-0001.safetensors"]

    code, _, err = quantize(capsys, tiny_trained, dst, recipe, *SMALL)
    assert code == 0, err
    assert file_hashes(dst) == file_hashes(uninterrupted)
    if recipe != "w4a16-g128-gptq":  # and it is a different quantization from plain GPTQ's
        assert file_hashes(dst)["model.safetensors"] != file_hashes(gptq_output)["model.safetensors"]


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_below_min_tokens_falls_back_visibly(tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             signed: bool) -> None:
    # min_tokens above any expert's count: with fallback rtn every expert is rounded to nearest,
    # bit for bit (in the recipe's scale convention), and the run says so; nothing is quantized
    # from empty statistics.
    recipe = tmp_path / "rtn-fallback.yaml"
    recipe.write_text(
        "name: fallback\nmethod: gptq\nrules:\n  - targets: [routed_experts]\n"
        "    weights: {bits: 4, group_size: 128}\ncalibration: {min_tokens: 1000000, fallback: rtn}\n"
        f"gptq: {{signed_scales: {str(signed).lower()}}}\n")
    code, out, err = quantize(capsys, tiny_trained, tmp_path / "out", str(recipe), *SMALL)
    assert code == 0, err
    assert "min_tokens 1000000; applied rtn_fallback" in " ".join(err.split())
    coverage = json.loads((tmp_path / "out" / COVERAGE_NAME).read_text())
    assert all(e["policy"] == "rtn_fallback" and e["statistics_tokens"] == 0
               for entry in coverage["layers"] for e in entry["experts"])
    assert len(coverage["below_min_tokens"]) == 4 * 8
    checkpoint = Checkpoint.open(tiny_trained)
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = checkpoint.layout.layer_key(2, "feed_forward.experts.5.down_proj")
    source = checkpoint.read_expert(2, 5)[2]
    if signed:
        scale, _ = primitives.compute_qparams(source, Scheme(4, 128, True), source.dtype, signed=True)
        q = primitives.quantize(source, scale, None, Scheme(4, 128, True))
        expected = PackedWeight.from_quantized(q, scale, None, Scheme(4, 128, True))
        assert bool((expected.scale < 0).any())
    else:
        expected = rtn_quantize(source, Scheme(4, 128, True))
    assert torch.equal(stored[f"{name}.weight_packed"], expected.packed)
    assert torch.equal(stored[f"{name}.weight_scale"], expected.scale)


def test_all_experts_statistics_see_every_token(tiny_trained: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = quantize(capsys, tiny_trained, tmp_path / "all", "w4a16-g128-clip", "--all-experts", *SMALL)
    assert code == 0, err
    coverage = json.loads((tmp_path / "all" / COVERAGE_NAME).read_text())
    assert coverage["settings"]["all_experts"] is True
    for entry in coverage["layers"]:
        assert all(e["policy"] == "all_experts" and e["statistics_tokens"] == entry["tokens"] for e in entry["experts"])
    assert "all_experts 8" in out


def test_calibrated_int4_is_closer_to_bf16_than_round_to_nearest(
    gptq_output: Path, tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = quantize(capsys, tiny_trained, tmp_path / "rtn", "w4a16-g128")
    assert code == 0, err
    windows = evaluation_windows(tiny_trained, 128, samples=48)
    reference = load_model(tiny_trained, dtype=torch.float32)
    kl = {}
    for name, path in (("rtn", tmp_path / "rtn"), ("gptq", gptq_output)):
        candidate = load_model(path, dtype=torch.float32, backend="reference")
        kl[name] = compare_models(candidate, reference, windows).kl["mean"]  # type: ignore[index]
    assert kl["gptq"] < 0.85 * kl["rtn"], kl


@pytest.mark.parametrize(("argv", "complaint"), [
    (["--recipe", "w4a16-g128", "--calibration", "builtin"], "calibration options apply to gptq and clip recipes"),
    (["--recipe", "w4a16-g128-gptq", "--calibration", "no-such-set"], "no-such-set"),
    (["--recipe", "w4a16-g128-gptq", "--seq-len", "100000"], "fewer than seq_len 100000"),
])
def test_bad_calibration_requests_are_one_line_errors(
    argv: list[str], complaint: str, tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["quantize", str(tiny_trained), "--out", str(tmp_path / "x"), *argv], capsys)
    assert code == 1
    assert complaint in " ".join(err.split())
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_hub_calibration_set_offline_is_one_line_naming_the_choices(
    tiny_trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    try:  # the libraries read the offline switches at import time
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    except ImportError:
        pass
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128-gptq", "--out",
                            str(tmp_path / "x"), "--calibration", "wikitext2"], capsys)
    assert code == 1
    assert "builtin" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_dry_run_reports_the_calibration_plan(tiny_trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128-gptq", "--dry-run", "--json",
                              "--samples", "8"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["estimated_calibration_peak_rss_bytes"] > 0
