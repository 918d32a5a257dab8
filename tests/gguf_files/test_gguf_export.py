"""`scoutq quantize --recipe gguf-*`: llama.cpp's names and metadata, values the gguf package
reads back exactly, byte-identical reruns, resume after a kill, eval and run on GGUF files,
and one clear line for bad input."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from helpers.cli import run_cli
from helpers.gguf import export, reader_equals_scoutq

from scoutq.checkpoint.gguf_file import GgufFile
from scoutq.data.corpus import builtin_corpus
from scoutq.model.load import load_model
from scoutq.pipeline.gguf_export import work_dir
from scoutq.pipeline.quantize import FAULT_ENV

RECIPES = ["gguf-q8_0", "gguf-q4_0", "gguf-q4_k", "gguf-bf16"]


@pytest.fixture(scope="module")
def exported(tiny_trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {recipe: export(tiny_trained, recipe, out / f"{recipe}.gguf") for recipe in RECIPES}
    files["gguf-q4_0-gptq"] = export(tiny_trained, "gguf-q4_0-gptq", out / "gptq.gguf", "--samples", "4",
                                     "--seq-len", "64")
    return files


@pytest.mark.parametrize("recipe", [*RECIPES, "gguf-q4_0-gptq"])
def test_the_gguf_package_reads_back_exactly_what_scoutq_dequantizes(recipe: str, exported: dict[str, Path]) -> None:
    equal = reader_equals_scoutq(exported[recipe])
    assert equal and all(equal.values()), equal
    expected = {"gguf-q8_0": "q8_0", "gguf-q4_0": "q4_0", "gguf-q4_k": "q4_k", "gguf-bf16": "bf16",
                "gguf-q4_0-gptq": "q4_0"}[recipe]
    assert expected in equal


def test_llama_cpp_names_shapes_and_types(exported: dict[str, Path], tiny_trained: Path) -> None:
    file = GgufFile.open(exported["gguf-q4_0"])
    config = file.text_config()
    assert file.key("general.architecture") == "llama4"
    assert file.key("llama4.expert_count") == 8 and file.key("llama4.expert_feed_forward_length") == 256
    assert file.key("llama4.feed_forward_length") == 512 and file.key("llama4.interleave_moe_layer_step") == 1
    assert file.key("tokenizer.ggml.model") == "gpt2" and file.key("tokenizer.ggml.pre") == "gpt-2"
    assert file.tensors["blk.0.ffn_gate_exps.weight"].shape == (8, 256, 256)
    assert file.tensors["blk.0.ffn_down_exps.weight"].shape == (8, 256, 256)
    assert file.tensors["blk.0.ffn_gate_exps.weight"].kind == "q4_0"
    assert file.tensors["blk.0.attn_q.weight"].kind == "q4_0"
    assert file.tensors["blk.0.ffn_gate_inp.weight"].kind == "f32"  # the router stays full precision
    assert file.tensors["blk.0.attn_norm.weight"].kind == "f32"
    assert file.tensors["token_embd.weight"].kind == "bf16" and file.tensors["output.weight"].kind == "bf16"
    assert "rope_freqs.weight" in file.tensors
    assert not any("vision" in name or "mm" in name for name in file.tensors)
    source = load_model(tiny_trained, dtype=torch.float32).config
    assert (config.use_rope, config.chunked_attention, config.attention_chunk_size, config.moe_layers) == \
        (source.use_rope, source.chunked_attention, source.attention_chunk_size, source.moe_layers)


def test_the_router_and_unquantized_tensors_are_the_source_values(exported: dict[str, Path], tiny_trained: Path) -> None:
    source = load_model(tiny_trained, dtype=torch.float32)
    model = load_model(exported["gguf-q4_0"], dtype=torch.float32)
    assert torch.equal(model.layers[2].feed_forward.router.weight, source.layers[2].feed_forward.router.weight)
    assert torch.equal(model.embed_tokens.weight, source.embed_tokens.weight)
    assert not torch.equal(model.layers[2].self_attn.q_proj.weight, source.layers[2].self_attn.q_proj.weight)


def test_a_bf16_gguf_evaluates_identical_to_its_source(exported: dict[str, Path], tiny_trained: Path,
                                                       capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Nothing quantized: scoutq's runtime on the GGUF gives the source's logits exactly (KL 0, top-1
    100%), which checks names, layouts, rope factors and the recorded config together."""
    code, _, err = run_cli(["eval", str(exported["gguf-bf16"]), "--reference", str(tiny_trained), "--samples", "4",
                            "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kl"]["mean"] == 0.0
    assert report["top1_agreement"] == 1.0


def test_eval_and_run_take_a_quantized_gguf(exported: dict[str, Path], tiny_trained: Path,
                                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(["eval", str(exported["gguf-q4_0"]), "--reference", str(tiny_trained), "--samples", "4",
                            "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 < report["kl"]["mean"] < 0.2
    code, out, err = run_cli(["run", str(exported["gguf-q4_0"]), "--prompt", "The with statement", "--max-new-tokens",
                              "8", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["generated_tokens"] >= 1


def test_the_embedded_tokenizer_gives_the_checkpoints_ids(exported: dict[str, Path], tiny_trained: Path) -> None:
    from tokenizers import Tokenizer

    ours = GgufFile.open(exported["gguf-q4_0"]).tokenizer()
    theirs = Tokenizer.from_file(str(tiny_trained / "tokenizer.json"))
    texts = builtin_corpus().evaluation[:8] + ["  two spaces", "trailing  ", "tab\tnew\n\nline", "ünïcödé 12345",
                                               "<|begin_of_text|>special"]
    for text in texts:
        assert ours.encode(text).ids == theirs.encode(text).ids, text


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_same_bytes_and_a_rerun_is_a_no_op(exported: dict[str, Path], tiny_trained: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    again = export(tiny_trained, "gguf-q4_k", tmp_path / "again.gguf")
    assert sha256(again) == sha256(exported["gguf-q4_k"])
    code, out, err = run_cli(["quantize", str(tiny_trained), "--recipe", "gguf-q4_k", "--out", str(again)], capsys)
    assert code == 0 and "nothing to do" in out, out + err
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "gguf-q8_0", "--out", str(again)], capsys)
    assert code == 1 and "--overwrite" in err and sha256(again) == sha256(exported["gguf-q4_k"])


def test_a_killed_export_resumes_to_the_same_bytes(exported: dict[str, Path], tiny_trained: Path, tmp_path: Path) -> None:
    dst = tmp_path / "killed.gguf"
    command = [sys.executable, "-m", "scoutq.cli.app", "quantize", str(tiny_trained), "--recipe", "gguf-q4_0",
               "--out", str(dst)]
    env = {**os.environ, FAULT_ENV: "3000000"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not dst.exists() and (work_dir(dst) / "journal.json").is_file()
    env.pop(FAULT_ENV)
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert sha256(dst) == sha256(exported["gguf-q4_0"]) and not work_dir(dst).exists()


def test_recipe_and_destination_mistakes_are_one_line(tiny_trained: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "w4a16-g128", "--out", str(tmp_path / "x.gguf")],
                           capsys)
    assert code == 1 and "gguf-* recipe" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nformat: gguf\nmethod: gptq\nrules:\n  - targets: [routed_experts]\n"
                   "    weights: {ggml_type: q4_k}\n")
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", str(bad), "--out", str(tmp_path / "y.gguf")],
                           capsys)
    assert code == 1 and "round-to-nearest only" in err
    code, _, err = run_cli(["quantize", str(tiny_trained), "--recipe", "gguf-q4_0", "--out", str(tmp_path)], capsys)
    assert code == 1 and "is a directory" in err


def test_q4_k_refuses_rows_that_are_not_whole_super_blocks(tiny_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["quantize", str(tiny_checkpoint), "--recipe", "gguf-q4_k", "--out",
                            str(tmp_path / "k.gguf")], capsys)
    assert code == 1 and "q4_k blocks of 256" in err and not (tmp_path / "k.gguf").exists()


# -- bad GGUF input ----------------------------------------------------------------------------


def corrupted(source: Path, tmp_path: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(source.read_bytes())
    edit(data, GgufFile.open(source))
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def expect_one_line(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code == 1, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_gguf_files_are_one_line(exported: dict[str, Path], tiny_trained: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = exported["gguf-q4_0"]

    def truncate(data: bytearray, file: GgufFile) -> None:
        del data[len(data) - 100_000:]

    def unknown_type(data: bytearray, file: GgufFile) -> None:
        # The type field of the first tensor info: after its name, dims count and dims.
        reader = file.reader
        field = reader.tensors[0].field
        type_part = field.parts[4]
        offset = field.offset + sum(int(part.nbytes) for part in field.parts[:4])
        assert type_part.nbytes == 4
        data[offset:offset + 4] = (99).to_bytes(4, "little")

    def more_tensors(data: bytearray, file: GgufFile) -> None:
        count = int.from_bytes(data[8:16], "little")
        data[8:16] = (count + 1).to_bytes(8, "little")

    def fewer_tensors(data: bytearray, file: GgufFile) -> None:
        count = int.from_bytes(data[8:16], "little")
        data[8:16] = (count - 1).to_bytes(8, "little")

    for name, edit in (("truncated", truncate), ("unknown-type", unknown_type), ("more-tensors", more_tensors),
                       ("fewer-tensors", fewer_tensors)):
        path = corrupted(source, tmp_path, f"{name}.gguf", edit)
        expect_one_line(["eval", str(path), "--reference", str(tiny_trained), "--samples", "2"], capsys, str(path))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    expect_one_line(["run", str(not_gguf), "--prompt", "x"], capsys, str(not_gguf))
    # and a GGUF of another architecture
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, "llama")
    writer.write_header_to_file(other)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    expect_one_line(["run", str(other), "--prompt", "x"], capsys, "llama4")
