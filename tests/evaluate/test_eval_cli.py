"""`scoutq eval` reports and `make release`, on the tiny fixtures."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import quantize_or_fail, run_cli

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quantized_trained(tiny_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("eval") / "w4"
    quantize_or_fail(tiny_trained, "w4a16-g128", dst)
    return dst


def test_eval_against_reference_writes_every_report(
    quantized_trained: Path, tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["eval", str(quantized_trained), "--reference", str(tiny_trained), "--samples", "24",
                              "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
                              "--plots", str(tmp_path / "plots")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["format"] == "scoutq-eval/1"
    assert report["dataset"] == {"name": "builtin (evaluation split)", "seq_len": 128, "windows": 24,
                                 "tokens_scored": 24 * 127, "windowing": "stream"}
    ppl, ref = report["perplexity"], report["reference_perplexity"]
    assert ppl["low"] < ppl["value"] < ppl["high"]
    assert report["perplexity_gap_pct"] == pytest.approx(100 * (ppl["value"] / ref["value"] - 1))
    low, high = report["perplexity_gap_interval_pct"]
    assert low < report["perplexity_gap_pct"] < high
    assert 0 < report["kl"]["mean"] < 0.1 and report["kl"]["p99"] >= report["kl"]["median"]
    assert 0.8 < report["top1_agreement"] < 1.0
    assert [r["layer"] for r in report["routing"]] == [0, 1, 2, 3]
    assert all(0.8 < r["agreement"] <= 1.0 for r in report["routing"])
    for entry in report["routing"]:
        assert sum(entry["expert_share"]) == pytest.approx(1.0)
    errors = report["quantization_error"]
    assert errors["layers"] == [0, 1, 2, 3] and len(errors["weight_sqnr_db"][0]) == 8
    # int4 group-128 RTN of trained weights: around 16-20 dB in the weights.
    assert all(12 < v < 25 for row in errors["weight_sqnr_db"] for v in row)
    assert len(errors["shared_output_sqnr_db"]) == 4
    markdown = (tmp_path / "r.md").read_text()
    assert "| KL divergence mean |" in markdown and "### Expert output SQNR" in markdown
    for name in ("weight_sqnr_db.png", "output_sqnr_db.png", "routing.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "perplexity gap" in out


def test_a_model_against_itself_agrees_exactly(tiny_trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["eval", str(tiny_trained), "--reference", str(tiny_trained), "--samples", "8",
                              "--json", "-"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["kl"]["max"] <= 1e-9
    assert report["top1_agreement"] == 1.0
    assert all(r["agreement"] == 1.0 for r in report["routing"])
    assert report["perplexity_gap_pct"] == 0.0
    assert report["perplexity_gap_interval_pct"] == [0.0, 0.0]
    assert report["quantization_error"] is None  # nothing is quantized


def test_eval_without_reference_and_with_latency(quantized_trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["eval", str(quantized_trained), "--samples", "4", "--latency", "--json", "-"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["kl"] is None and report["reference_perplexity"] is None
    assert all(r["agreement"] is None for r in report["routing"])
    latency = report["latency"]
    assert latency["prefill_tokens_per_s"] > 0 and latency["time_to_first_token_s"] > 0
    assert set(latency["decode"]) == {"1", "4", "16"}
    assert latency["weight_bytes"] > 0 and latency["peak_rss_bytes"] > 0


def test_eval_reads_a_local_text_file(tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the with statement wraps a block in a context manager." for i in range(60)))
    code, out, err = run_cli(["eval", str(tiny_trained), "--dataset", str(text), "--seq-len", "64", "--json", "-"],
                             capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["dataset"]["windows"] > 1 and report["dataset"]["seq_len"] == 64


@pytest.mark.parametrize(("argv", "complaint"), [
    (["--dataset", "missing.txt"], "missing.txt"),
    (["--reference", "/no/such/dir"], "/no/such/dir"),
    (["--seq-len", "100000"], "fewer than one window"),
])
def test_eval_bad_input_is_one_line(argv: list[str], complaint: str, tiny_trained: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["eval", str(tiny_trained), *argv], capsys)
    assert code == 1
    assert complaint in " ".join(err.split()) and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_release_produces_checksummed_artifacts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # -o install: use the interpreter running the tests instead of (re)building the Makefile's venv.
    done = subprocess.run(["make", "-o", "install", "release", f"BIN={Path(sys.executable).parent}",
                           f"SRC={tiny_checkpoint}", "RECIPES=w4a16-g128 w8a16", f"DIST={dist}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    stem = tiny_checkpoint.name
    for recipe in ("w4a16-g128", "w8a16"):
        assert (dist / f"{stem}-{recipe}" / "scoutq-manifest.json").is_file()
        report = json.loads((dist / f"{stem}-{recipe}.eval.json").read_text())
        assert report["reference"] == str(tiny_checkpoint) and report["kl"]["mean"] >= 0
        assert (dist / f"{stem}-{recipe}.eval.md").read_text().startswith("## Evaluation of")
    sums = (dist / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in sums}
    files = {p.relative_to(dist).as_posix() for p in dist.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((dist / name).read_bytes()).hexdigest() == digest


def test_layer_walked_eval_agrees_with_the_resident_runtime(
    quantized_trained: Path, tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--reference", str(tiny_trained), "--samples", "16", "--json", "-"]
    code, out, err = run_cli(["eval", str(quantized_trained), *common, "--backend", "reference"], capsys)
    assert code == 0, err
    resident = json.loads(out)
    # top-k = the whole vocabulary (2048): the walked KL is then exact, not the top-k bound.
    code, out, err = run_cli(["eval", str(quantized_trained), *common, "--layer-walk", "--top-k", "2048"], capsys)
    assert code == 0, err
    walked = json.loads(out)
    assert walked["perplexity"]["value"] == pytest.approx(resident["perplexity"]["value"], rel=1e-4)
    assert walked["reference_perplexity"]["value"] == pytest.approx(resident["reference_perplexity"]["value"], rel=1e-5)
    assert walked["kl"]["mean"] == pytest.approx(resident["kl"]["mean"], rel=0.02)
    assert walked["top1_agreement"] == pytest.approx(resident["top1_agreement"], abs=0.005)
    for ours, theirs in zip(walked["routing"], resident["routing"], strict=True):
        assert ours["agreement"] == pytest.approx(theirs["agreement"], abs=0.005)
        assert ours["expert_share"] == pytest.approx(theirs["expert_share"], abs=0.005)

    # A stored top-32 reference, reused: same perplexities; KL is the top-k lower bound, close to exact.
    stored = tmp_path / "reference.safetensors"
    code, _, err = run_cli(["eval", str(tiny_trained), "--layer-walk", "--samples", "16", "--top-k", "32",
                            "--save-reference", str(stored)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["eval", str(quantized_trained), "--layer-walk", "--reference", str(stored),
                              "--json", "-"], capsys)
    assert code == 0, err
    reused = json.loads(out)
    assert reused["perplexity"]["value"] == pytest.approx(walked["perplexity"]["value"], rel=1e-9)
    assert reused["reference_perplexity"]["value"] == pytest.approx(walked["reference_perplexity"]["value"], rel=1e-9)
    assert 0.5 * walked["kl"]["mean"] <= reused["kl"]["mean"] <= walked["kl"]["mean"] * (1 + 1e-6)  # measured 0.76x
    assert reused["top1_agreement"] == walked["top1_agreement"]
