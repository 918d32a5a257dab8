"""Checkpoints made by llm-compressor itself, read by scoutq bit for bit as compressed-tensors reads them.

llm-compressor pins its own transformers and compressed-tensors, so it lives in its own venv
(`make install-llmc`, .cache/llmc-venv); scoutq/bench/llmc_quantize.py runs there on the tiny
random fixture (W4A16 round-to-nearest, and GPTQ with its default actorder static, the case
that scoutq used to refuse). Here, in scoutq's venv, every quantized module decodes through
scoutq.foreign exactly as compressed-tensors' decompressor decodes it, and `scoutq eval` and
`scoutq verify --foreign` run on both. `make test-llmc` runs this; without the venv it skips,
unless SCOUTQ_REQUIRE_LLMC=1 (then a missing venv fails).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli

from scoutq.checkpoint.reader import Checkpoint
from scoutq.data.corpus import builtin_corpus
from scoutq.foreign import weight_source
from scoutq.quant.packed import PackedWeight

pytestmark = pytest.mark.llmc
REPO = Path(__file__).resolve().parents[2]
LLMC_PYTHON = Path(os.environ.get("SCOUTQ_LLMC_PYTHON", REPO / ".cache" / "llmc-venv" / "bin" / "python"))
if not (LLMC_PYTHON.is_file() and (LLMC_PYTHON.parent.parent / ".llmc-installed").is_file()):
    if os.environ.get("SCOUTQ_REQUIRE_LLMC"):
        raise RuntimeError(f"no llm-compressor venv at {LLMC_PYTHON} (make install-llmc)")
    pytest.skip("needs llm-compressor in its own venv (make test-llmc)", allow_module_level=True)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402


@pytest.fixture(scope="module", params=["rtn", "gptq"])
def made(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llmc") / request.param
    texts = out.parent / "calibration.json"
    texts.write_text(json.dumps(builtin_corpus().calibration))
    script = REPO / "scoutq" / "bench" / "llmc_quantize.py"
    done = subprocess.run([str(LLMC_PYTHON), "-P", str(script), str(tiny_checkpoint), str(out), request.param,
                           str(texts)], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_llm_compressor_checkpoint_decodes_as_compressed_tensors(made: Path) -> None:
    checkpoint = Checkpoint.open(made)
    qconfig = checkpoint.config_json["quantization_config"]
    group = qconfig["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(group)
    source = weight_source(checkpoint)
    modules = sorted(key.removesuffix(".weight_packed") for key in checkpoint.tensors if key.endswith(".weight_packed"))
    assert any(".experts." in m for m in modules) and not any("router" in m for m in modules)
    for module in modules:
        state = {key.rsplit(".", 1)[1]: checkpoint.read(key) for key in checkpoint.tensors
                 if key.rsplit(".", 1)[0] == module}
        theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        found = source.weight(module)
        assert isinstance(found, PackedWeight), module  # groups in order: stays packed
        assert torch.equal(found.dequantize(), theirs), module


def test_eval_and_verify_run_on_it(made: Path, tiny_checkpoint: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["verify", str(made), "--foreign", "--json"], capsys)
    assert code == 0 and json.loads(out)["quantized_routers"] == [], err
    report = tmp_path / "r.json"
    code, _, err = run_cli(["eval", str(made), "--reference", str(tiny_checkpoint), "--samples", "4",
                            "--seq-len", "32", "--json", str(report)], capsys)
    assert code == 0, err
    assert 0 < json.loads(report.read_text())["kl"]["mean"] < 1.0
