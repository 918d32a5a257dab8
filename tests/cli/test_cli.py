"""The CLI surface: help with examples, JSON output, fixture reuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import run_cli as run


@pytest.mark.parametrize("command", ["inspect", "fixture", "quantize", "verify", "run", "bench kernels", "bench moe",
                                     "bench crossover"])
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*command.split(), "--help"], capsys)
    assert code == 0 and "Examples" in out and f"scoutq {command}" in out


def test_inspect_json(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(tiny_checkpoint), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["layout"] == "multimodal"
    assert summary["architecture"]["experts"] == 4 and summary["architecture"]["nope_layers"] == 1
    roles = {r["role"] for r in summary["roles"]}
    assert {"router", "experts_gate_up", "experts_down", "shared_gate", "vision", "projector"} <= roles
    # Headers only: bytes and parameters add up over every tensor.
    assert sum(r["bytes"] for r in summary["roles"]) == summary["bytes"]
    assert summary["parameters"]["total"] == sum(r["parameters"] for r in summary["roles"])


def test_inspect_text_only_table(tiny_text_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["inspect", str(tiny_text_checkpoint)], capsys)
    assert code == 0 and "text layout" in out and "router" in out


def test_fixture_refuses_to_overwrite_and_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny"
    assert run(["fixture", str(out), "--preset", "tiny-text"], capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(["fixture", str(out), "--preset", "tiny-text"], capsys)
    assert code == 1 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, out_text, _ = run(["fixture", str(out), "--preset", "tiny-text", "--reuse"], capsys)
    assert code == 0 and "reusing" in out_text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_usage_error_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "scoutq.cli.app", "fixture", "x", "--preset", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
