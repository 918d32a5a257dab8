"""`make bench-gpu`'s script runs its steps end to end on the tiny fixture on the CPU (the GPU
machine runs the same code at real shapes), and says so plainly where CUDA is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "scoutq.bench.gpu", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def test_the_gpu_script_runs_on_the_tiny_fixture(tmp_path: Path) -> None:
    done = bench("--tiny", "--device", "cpu", "--samples", "2", "--seq-len", "16", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout[done.stdout.index("bench-gpu (cpu"):]
    assert "quantize w4a16-g128 (RTN)" in table and "calibrate w4a16-g128-gptq, cpu, 1 rank" in table
    assert (tmp_path / "tiny-gptq-cpu-1" / "model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_without_cuda_the_script_says_so(tmp_path: Path) -> None:
    done = bench("--dir", str(tmp_path))
    assert done.returncode == 1 and "no CUDA device is visible" in done.stdout
