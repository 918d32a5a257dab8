"""--device: where the stream and calibration compute. CPU checks run everywhere; the CUDA
comparisons are marked `gpu` and skip without a GPU.

* cpu, auto (without a GPU) and a bad name resolve or fail with one clear line; `--device cuda`
  without CUDA is exit 1 with one line, for quantize and eval, and writes nothing.
* On a GPU: the stream on CUDA equals the resident model on CUDA (fp32, 1e-4); a calibrated
  quantization on CUDA is close to the CPU's (the share of int4 words that differ and each
  output's KL against bf16 are printed and bounded); two GPU ranks give one GPU's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.models import resident_trace

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ScoutqError
from scoutq.stream.processes import resolve_device
from scoutq.stream.walk import LayerStream

SMALL = ["--samples", "8", "--seq-len", "32"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")


def scoutq(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "scoutq", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def test_device_names_resolve_or_fail_clearly() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ScoutqError, match="--device tpu: expected one of auto, cpu, cuda"):
        resolve_device("tpu")


@no_cuda
def test_cuda_without_a_gpu_is_one_line() -> None:
    with pytest.raises(ScoutqError, match="--device cuda: no CUDA device is visible"):
        resolve_device("cuda")


@no_cuda
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_cli_device_cuda_without_a_gpu_exits_1_writing_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                                              command: str) -> None:
    out = tmp_path / "out"
    args = (["quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128-gptq", "--out", str(out), *SMALL]
            if command == "quantize" else ["eval", str(tiny_checkpoint), "--samples", "2"])
    done = scoutq(*args, "--device", "cuda")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no CUDA device is visible"), done.stderr
    assert not out.exists()


@pytest.mark.gpu
def test_stream_on_cuda_equals_the_resident_model_on_cuda(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint)
    windows = torch.randint(0, checkpoint.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    outputs, _, _ = resident_trace(tiny_checkpoint, windows)  # CPU, fp32
    stream = LayerStream(checkpoint, device="cuda")
    hidden = stream.start(windows)
    for layer in range(checkpoint.config.num_hidden_layers):
        hidden = stream.layer(layer, hidden)
        assert hidden.main.device.type == "cuda"
        torch.testing.assert_close(hidden.main.cpu(), outputs[layer], rtol=1e-4, atol=1e-4)


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.gpu
def test_calibration_on_cuda_is_close_to_the_cpus(tiny_trained: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / device
        done = scoutq("quantize", str(tiny_trained), "--recipe", "w4a16-g128-gptq", "--out", str(outputs[device]),
                      "--device", device, *SMALL)
        assert done.returncode == 0, done.stderr
    cpu, cuda = (load_file(str(outputs[d] / "model.safetensors")) for d in ("cpu", "cuda"))
    packed = [name for name in cpu if name.endswith("weight_packed")]
    differ = sum(int((cpu[n] != cuda[n]).sum()) for n in packed) / sum(cpu[n].numel() for n in packed)
    kl = {}
    for device, out in outputs.items():
        report = tmp_path / f"{device}.json"
        done = scoutq("eval", str(out), "--reference", str(tiny_trained), "--samples", "32", "--json", str(report))
        assert done.returncode == 0, done.stderr
        kl[device] = json.loads(report.read_text())["kl"]["mean"]
    print(f"int4 words differing CPU vs CUDA: {differ:.2%}; KL vs bf16: cpu {kl['cpu']:.5f}, cuda {kl['cuda']:.5f}")
    # Float sums differ between the devices, so a few codes round the other way; quality must not.
    assert differ < 0.10
    assert kl["cuda"] <= 1.25 * kl["cpu"] + 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ranks_write_one_gpus_bytes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for out, extra in ((one, []), (two, ["--nproc", "2"])):
        done = scoutq("quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128-gptq", "--out", str(out),
                      "--device", "cuda", *SMALL, *extra)
        assert done.returncode == 0, done.stderr
    assert _digest(one) == _digest(two)
