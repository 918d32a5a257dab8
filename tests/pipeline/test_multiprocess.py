"""Several processes (torch.distributed, gloo) quantize to exactly the bytes of one process.

* `scoutq quantize --nproc N` for N = 1, 2, 3 writes byte-identical files (every file of the
  output: shards, config, coverage, manifest) for round-to-nearest, GPTQ and GPTQ with
  full-precision targets, on the tiny random checkpoint; so does torchrun (at the same thread
  count per process: torchrun's default of one thread changes a matmul's float sums).
* A rank killed in the middle of a layer fails the run with one line naming it, leaves no
  complete-looking output, and the same command then resumes to the same bytes.
* A bad input fails every rank with rank 0's one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SMALL = ["--samples", "8", "--seq-len", "32"]
TIMEOUT = 300


def scoutq(*args: str, env: dict[str, str] | None = None, runner: list[str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    command = (runner or [sys.executable, "-m", "scoutq"]) + list(args)
    full_env = {**os.environ, **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None) if name not in (env or {}) else None
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=full_env, check=False)


def digests(directory: Path) -> dict[str, str]:
    return {entry.name: hashlib.sha256(entry.read_bytes()).hexdigest()
            for entry in sorted(directory.iterdir()) if entry.is_file()}


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """One process's output of each recipe: what every multi-process run must reproduce."""
    out = tmp_path_factory.mktemp("single")
    result = {}
    for recipe in ("w4a16-g128", "w4a16-g128-gptq", "w4a16-g128-gptaq"):
        extra = SMALL if recipe != "w4a16-g128" else []
        done = scoutq("quantize", str(tiny_checkpoint), "--recipe", recipe, "--out", str(out / recipe), *extra)
        assert done.returncode == 0, done.stderr
        result[recipe] = digests(out / recipe)
    return result


# Every recipe with 2 ranks, and an uneven split (3 ranks, 8 experts) for GPTQ; the full
# 3 x {2, 3} matrix takes a minute more on 2 cores and gave the same bytes when run.
@pytest.mark.parametrize(("recipe", "nproc"), [("w4a16-g128", 2), ("w4a16-g128-gptq", 2), ("w4a16-g128-gptq", 3),
                                               ("w4a16-g128-gptaq", 2)])
def test_any_number_of_ranks_writes_the_same_bytes(tiny_checkpoint: Path, tmp_path: Path, single: dict,
                                                   recipe: str, nproc: int) -> None:
    extra = SMALL if recipe != "w4a16-g128" else []
    done = scoutq("quantize", str(tiny_checkpoint), "--recipe", recipe, "--out", str(tmp_path / "out"), *extra,
                  "--nproc", str(nproc))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and done.stdout.count("wrote") == 1  # one report: rank 0's
    written = digests(tmp_path / "out")
    assert "model.safetensors" in written and written == single[recipe]


def test_torchrun_runs_the_same_command(tiny_checkpoint: Path, tmp_path: Path, single: dict) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "scoutq"]
    # torchrun sets OMP_NUM_THREADS=1 unless it is set: a matmul's float sums depend on its threads,
    # so the run is compared with one process at the same thread count (torch's default here).
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = scoutq("quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128-gptq", "--out", str(tmp_path / "out"),
                  *SMALL, runner=torchrun, env=threads)
    assert done.returncode == 0, done.stderr
    assert digests(tmp_path / "out") == single["w4a16-g128-gptq"]


def test_a_rank_killed_mid_layer_fails_cleanly_and_the_rerun_resumes(tiny_checkpoint: Path, tmp_path: Path,
                                                                     single: dict) -> None:
    out = tmp_path / "out"
    command = ["quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128-gptq", "--out", str(out), *SMALL,
               "--nproc", "2"]
    killed = scoutq(*command, env={"SCOUTQ_FAULT_IN_LAYER": "2", "SCOUTQ_FAULT_RANK": "1"})
    assert killed.returncode == 1
    lines = [line for line in killed.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank 1 died (SIGKILL) while quantizing "), killed.stderr
    # The line names the routed expert the rank held: layer 2's, as the fault hook chose.
    assert re.search(r"layers\.2\.feed_forward\.experts\.\d+\.\{gate_proj,up_proj,down_proj\}", lines[-1]), lines[-1]
    assert not (out / "model.safetensors").exists() and not (out / "scoutq-manifest.json").exists()
    state = (out / ".scoutq-calibration" / "state.json").read_text()
    assert '"next_layer": 2' in state  # layers 0 and 1 were committed before the kill in layer 2

    resumed = scoutq(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert digests(out) == single["w4a16-g128-gptq"]


def test_a_bad_input_fails_every_rank_with_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something.txt").write_text("not a scoutq run")
    done = scoutq("quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128-gptq", "--out", str(out), *SMALL,
                  "--nproc", "2")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(out) in errors[0], done.stderr  # rank 0's line; the others are quiet
    assert (out / "something.txt").read_text() == "not a scoutq run"


def test_a_calibrated_gguf_export_with_two_ranks_writes_the_same_bytes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Attention is quantized too in the gguf recipes, so every rank must compute on with exactly
    the values the Q4_0 / Q8_0 blocks hold (PackedWeight.reconstructed), as one process does."""
    files = {}
    for nproc in ("1", "2"):
        files[nproc] = tmp_path / f"ranks{nproc}.gguf"
        done = scoutq("quantize", str(tiny_checkpoint), "--recipe", "gguf-q4_0-gptq", "--out", str(files[nproc]),
                      *SMALL, "--nproc", nproc)
        assert done.returncode == 0, done.stderr
    assert hashlib.sha256(files["1"].read_bytes()).digest() == hashlib.sha256(files["2"].read_bytes()).digest()
