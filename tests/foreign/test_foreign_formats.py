"""Other tools' quantized checkpoints, read by scoutq.foreign, bit for bit as their decoders read them.

Each format is built from the tiny random fixture (tests/helpers/foreign_formats.py: the
producers' documented layouts). Decoders: compressed-tensors' own decompressor for its formats;
for GPTQ and AWQ, plain-loop twins of GPTQModel's and AutoAWQ's unpacking (their packages need
CUDA builds), written here from the same documented layout; bitsandbytes' own functions for its
checkpoints, which transformers writes. The runtime then loads each and runs `scoutq eval`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import run_cli
from helpers.foreign_formats import (
    AWQ_ORDER,
    awq_tensors,
    ct_naive_tensors,
    ct_pack_tensors,
    gptq_tensors,
    quantize,
    write_foreign,
)

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ConfigError
from scoutq.foreign import WeightSource, weight_source
from scoutq.model.load import load_model
from scoutq.quant import primitives
from scoutq.quant.packed import PackedWeight
from scoutq.quant.scheme import Scheme

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

GROUP = 32


def ct_config(weights: dict[str, Any], fmt: str) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["re:.*router.*", "re:.*lm_head.*", "re:.*vision_model.*", "re:.*multi_modal_projector.*"]}


# (name, CT weights args, storage format, scheme, act-order seed, per-tensor scale)
CT_VARIANTS = [
    ("pack int4 g32 sym, actorder static", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                            "group_size": GROUP, "actorder": "static", "dynamic": False,
                                            "observer": "minmax"}, "pack-quantized", Scheme(4, GROUP, True), None, False),
    ("pack int4 g32 asym, actorder group + weight_g_idx", {"num_bits": 4, "type": "int", "symmetric": False,
                                                          "strategy": "group", "group_size": GROUP, "actorder": "group",
                                                          "dynamic": False},
     "pack-quantized", Scheme(4, GROUP, False), 7, False),
    ("pack int8 channel", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                           "group_size": None, "actorder": None, "dynamic": False},
     "pack-quantized", Scheme(8, None, True), None, False),
    ("naive int8 channel", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "group_size": None, "dynamic": False}, "naive-quantized", Scheme(8, None, True), None, False),
    ("naive int8 channel asym", {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel",
                                 "group_size": None, "dynamic": False},
     "naive-quantized", Scheme(8, None, False), None, False),
    ("naive int8 per-tensor", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                               "group_size": None, "dynamic": False}, "naive-quantized", Scheme(8, None, True), None, True),
]


def _module_state(checkpoint: Checkpoint, module: str) -> dict[str, torch.Tensor]:
    prefix = module + "."
    return {key[len(prefix):]: checkpoint.read(key) for key in checkpoint.tensors
            if key.startswith(prefix) and "." not in key[len(prefix):]}


def _quantized_modules(checkpoint: Checkpoint) -> list[str]:
    markers = (".weight_scale", ".qweight", ".SCB", ".weight.absmax")
    return sorted({key[: key.rindex(marker)] for key in checkpoint.tensors for marker in markers if key.endswith(marker)})


def _opened(variants: list[tuple[Any, ...]], built: dict[str, Path],
            name: str) -> tuple[tuple[Any, ...], Checkpoint, WeightSource, list[str]]:
    """A variant's row, its checkpoint, reader and quantized module names."""
    checkpoint = Checkpoint.open(built[name])
    return next(v for v in variants if v[0] == name), checkpoint, weight_source(checkpoint), \
        _quantized_modules(checkpoint)


@pytest.fixture(scope="module")
def ct_checkpoints(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built = {}
    for index, (name, weights, fmt, scheme, seed, per_tensor) in enumerate(CT_VARIANTS):
        def tensors(module: str, w: torch.Tensor, scheme: Scheme = scheme, seed: int | None = seed,
                    fmt: str = fmt, per_tensor: bool = per_tensor) -> dict[str, torch.Tensor]:
            quantized = quantize(w, scheme, w.dtype, seed, per_tensor)
            if fmt == "naive-quantized":
                return ct_naive_tensors(quantized, per_tensor)
            return ct_pack_tensors(quantized, with_g_idx=seed is not None)

        out = tmp_path_factory.mktemp("foreign") / f"ct-{index}"
        built[name] = write_foreign(tiny_checkpoint, out, ct_config(weights, fmt), tensors)
    return built


def g_idx_decode_twin(state: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """actorder "group" as compressed-tensors up to 0.19 and vLLM read it (quantized-formats.md B1:
    `weight_g_idx` names the group of each input column), element by element. compressed-tensors
    0.20 no longer decodes it (its QuantizationArgs refuse actorder "group"), so this twin is the
    oracle for that variant; the checkpoints exist and vLLM loads them."""
    shape = state["weight_shape"].tolist()
    q = primitives.unpack_int32(state["weight_packed"], bits, shape[1]).tolist()
    zero = primitives.unpack_zero_point(state["weight_zero_point"], bits, shape[0]).tolist() \
        if "weight_zero_point" in state else None
    scale, g_idx = state["weight_scale"], state["weight_g_idx"].tolist()
    out = torch.empty(shape, dtype=scale.dtype)
    for o in range(shape[0]):
        for i in range(shape[1]):
            group = g_idx[i]
            difference = torch.tensor(q[o][i] - (zero[o][group] if zero else 0), dtype=scale.dtype)
            out[o, i] = difference * scale[o, group]
    return out


@pytest.mark.parametrize("variant", [v[0] for v in CT_VARIANTS])
def test_compressed_tensors_variants_decode_as_its_decompressor(variant: str, ct_checkpoints: dict[str, Path]) -> None:
    (_, weights, fmt, scoutq_scheme, seed, _), checkpoint, source, modules = _opened(CT_VARIANTS, ct_checkpoints,
                                                                                    variant)
    assert len(modules) >= 4 * 4 * 3  # every routed expert projection at least
    if seed is None:
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights), format=fmt)
        compressor = PackedQuantizationCompressor if fmt == "pack-quantized" else NaiveQuantizationCompressor
        decode = lambda state: compressor.decompress(state, scheme)["weight"]  # noqa: E731
    else:
        decode = lambda state: g_idx_decode_twin(state, scoutq_scheme.bits)  # noqa: E731
        modules = modules[:: max(1, len(modules) // 8)]  # the twin goes element by element
    kinds = set()
    for module in modules:
        found = source.weight(module)
        kinds.add(type(found).__name__)
        ours = source.dense(module)
        theirs = decode(_module_state(checkpoint, module))
        assert ours is not None and ours.dtype == theirs.dtype, module
        assert torch.equal(ours, theirs), module
    # groups in order stay packed for the kernels; act-order groups can only be dense
    assert kinds == ({"Tensor"} if seed is not None else {"PackedWeight"}), kinds


# -- GPTQ and AWQ: twins of the producers' decoders ------------------------------------------


def gptq_decode_twin(tensors: dict[str, torch.Tensor], bits: int, v1: bool) -> torch.Tensor:
    """GPTQModel's torch dequantization, element by element: q from qweight[i // (32/b), o] field
    i % (32/b); z from qzeros[g, o // (32/b)] after v1's +1 per field word-add; (q - z) * s in fp16."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight, scales, g_idx = tensors["qweight"].tolist(), tensors["scales"], tensors["g_idx"].tolist()
    qzeros = tensors["qzeros"] + (sum(1 << (bits * k) for k in range(per)) if v1 else 0)
    qzeros = qzeros.tolist()
    out_features, in_features = scales.shape[1], len(g_idx)
    q = torch.empty(out_features, in_features, dtype=torch.float16)
    z = torch.empty(out_features, in_features, dtype=torch.float16)
    for i in range(in_features):
        for o in range(out_features):
            q[o, i] = ((qweight[i // per][o] & 0xFFFFFFFF) >> (bits * (i % per))) & mask
            z[o, i] = ((qzeros[g_idx[i]][o // per] & 0xFFFFFFFF) >> (bits * (o % per))) & mask
    s = scales.t()[:, torch.tensor(g_idx, dtype=torch.int64)]
    return (q - z) * s


def awq_decode_twin(tensors: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """AutoAWQ's dequantize_gemm, element by element: output o sits in field ORDER.index(o % 8) of
    word o // 8; (q - z) * s in fp16, the group of input i being i // group_size."""
    qweight, qzeros, scales = tensors["qweight"].tolist(), tensors["qzeros"].tolist(), tensors["scales"]
    in_features, out_features = len(qweight), scales.shape[1]
    q = torch.empty(out_features, in_features, dtype=torch.float16)
    z = torch.empty(out_features, in_features, dtype=torch.float16)
    for i in range(in_features):
        for o in range(out_features):
            shift = 4 * AWQ_ORDER.index(o % 8)
            q[o, i] = ((qweight[i][o // 8] & 0xFFFFFFFF) >> shift) & 0xF
            z[o, i] = ((qzeros[i // group][o // 8] & 0xFFFFFFFF) >> shift) & 0xF
    s = scales.t().repeat_interleave(group, dim=1)
    return (q - z) * s


GPTQ_VARIANTS = [  # (name, bits, group, symmetric, act-order seed, v1)
    ("int4 g32 sym v1", 4, GROUP, True, None, True),
    ("int4 g32 asym v2", 4, GROUP, False, None, False),
    ("int4 g32 asym v1 desc_act", 4, GROUP, False, 3, True),
    ("int8 channel sym v2", 8, None, True, None, False),
]


def _gptq_config(bits: int, group: int | None, symmetric: bool, desc_act: bool, v1: bool) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": bits, "group_size": group or -1, "desc_act": desc_act, "sym": symmetric,
            "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32", "lm_head": False,
            "meta": {"quantizer": ["gptqmodel:5.0"], "damp_percent": 0.05}}


@pytest.fixture(scope="module")
def gptq_checkpoints(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built = {}
    for index, (name, bits, group, symmetric, seed, v1) in enumerate(GPTQ_VARIANTS):
        def tensors(_: str, w: torch.Tensor, bits: int = bits, group: int | None = group, symmetric: bool = symmetric,
                    seed: int | None = seed, v1: bool = v1) -> dict[str, torch.Tensor]:
            return gptq_tensors(quantize(w, Scheme(bits, group, symmetric), torch.float16, seed), v1)

        out = tmp_path_factory.mktemp("foreign") / f"gptq-{index}"
        built[name] = write_foreign(tiny_checkpoint, out, _gptq_config(bits, group, symmetric, seed is not None, v1),
                                    tensors)
    return built


@pytest.mark.parametrize("variant", [v[0] for v in GPTQ_VARIANTS])
def test_gptq_decodes_as_gptqmodel(variant: str, gptq_checkpoints: dict[str, Path]) -> None:
    (_, bits, _, symmetric, seed, v1), checkpoint, source, modules = _opened(GPTQ_VARIANTS, gptq_checkpoints, variant)
    some = modules[:: max(1, len(modules) // 12)]  # the twin is element by element: a sample of modules
    for module in some:
        ours = source.dense(module)
        assert ours is not None and torch.equal(ours, gptq_decode_twin(_module_state(checkpoint, module), bits, v1))
    found = source.weight(modules[0])
    if seed is None:
        assert isinstance(found, PackedWeight) and found.scheme.symmetric == symmetric
    else:
        assert isinstance(found, torch.Tensor)


def test_gptq_dynamic_overrides_give_each_module_its_own_bits(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """GPTQModel's `dynamic`: down_proj in int8 per channel, everything else int4 g32, routers skipped."""
    def tensors(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        scheme = Scheme(8, None, True) if module.endswith("down_proj") else Scheme(4, GROUP, False)
        return gptq_tensors(quantize(w, scheme, torch.float16), v1=True)

    config = _gptq_config(4, GROUP, False, False, True) | {
        "dynamic": {"-:.*feed_forward\\.router.*": {}, "+:.*down_proj.*": {"bits": 8, "group_size": -1}}}
    path = write_foreign(tiny_checkpoint, tmp_path / "gptq-dynamic", config, tensors)
    checkpoint = Checkpoint.open(path)
    source = weight_source(checkpoint)
    assert "2 per-module overrides" in source.format
    modules = _quantized_modules(checkpoint)
    for module in modules[:: max(1, len(modules) // 12)]:
        bits = 8 if module.endswith("down_proj") else 4
        found = source.weight(module)
        assert isinstance(found, PackedWeight) and found.scheme.bits == bits, module
        assert torch.equal(found.dequantize(), gptq_decode_twin(_module_state(checkpoint, module), bits, v1=True))


@pytest.fixture(scope="module")
def awq_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    return write_foreign(tiny_checkpoint, tmp_path_factory.mktemp("foreign") / "awq", config,
                         lambda _, w: awq_tensors(quantize(w, Scheme(4, GROUP, False), torch.float16)))


def test_awq_decodes_as_autoawq(awq_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(awq_checkpoint)
    source = weight_source(checkpoint)
    modules = _quantized_modules(checkpoint)
    for module in modules[:: max(1, len(modules) // 12)]:
        ours = source.dense(module)
        assert ours is not None and torch.equal(ours, awq_decode_twin(_module_state(checkpoint, module), GROUP))
    assert isinstance(source.weight(modules[0]), PackedWeight)


def test_gptq_and_compressed_tensors_of_the_same_integers_run_the_same_logits(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """One set of integers and fp16 scales stored both ways: the runtime computes the same logits."""
    scheme = Scheme(4, GROUP, False)
    gptq = write_foreign(tiny_checkpoint, tmp_path / "gptq", _gptq_config(4, GROUP, False, False, True),
                         lambda _, w: gptq_tensors(quantize(w, scheme, torch.float16), v1=True))
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}
    compressed = write_foreign(tiny_checkpoint, tmp_path / "ct", ct_config(weights, "pack-quantized"),
                               lambda _, w: ct_pack_tensors(quantize(w, scheme, torch.float16), with_g_idx=False))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    for backend in ("reference", "cpu"):
        a = load_model(gptq, dtype=torch.float32, backend=backend)(ids)
        b = load_model(compressed, dtype=torch.float32, backend=backend)(ids)
        assert torch.equal(a, b), backend


# -- bitsandbytes, written by transformers -------------------------------------------------------


def saved_by_transformers(source: Path, out: Path, **settings: Any) -> Path:
    """`source` loaded by transformers with BitsAndBytesConfig(**settings) and saved: its own bnb checkpoint."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=transformers.BitsAndBytesConfig(**settings), dtype=torch.bfloat16,
        device_map="cpu")
    model.save_pretrained(out)
    for extra in source.iterdir():
        if extra.name.startswith("tokenizer"):
            (out / extra.name).write_bytes(extra.read_bytes())
    return out


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny_text_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_by_transformers(tiny_text_checkpoint, tmp_path_factory.mktemp("foreign") / "bnb-nf4",
                                 load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)


def test_bitsandbytes_nf4_from_transformers_decodes_as_bitsandbytes(bnb_checkpoint: Path) -> None:
    import bitsandbytes.functional as bnb_functional

    checkpoint = Checkpoint.open(bnb_checkpoint)
    source = weight_source(checkpoint)
    assert source.format == "bitsandbytes nf4, double quant"
    modules = _quantized_modules(checkpoint)
    assert modules and all(".experts." not in m for m in modules)  # transformers leaves fused experts alone
    for module in modules:
        state = {key.removeprefix(f"{module}.weight."): checkpoint.read(key) for key in checkpoint.tensors
                 if key.startswith(f"{module}.weight.")}
        quant_state = bnb_functional.QuantState.from_dict(state, device=torch.device("cpu"))
        theirs = bnb_functional.dequantize_4bit(checkpoint.read(f"{module}.weight"), quant_state)
        ours = source.dense(module)
        assert ours is not None and torch.equal(ours, theirs), module


@pytest.fixture(scope="module")
def bnb8_checkpoint(tiny_text_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_by_transformers(tiny_text_checkpoint, tmp_path_factory.mktemp("foreign") / "bnb-int8",
                                 load_in_8bit=True)


def test_bitsandbytes_int8_from_transformers_decodes_as_bitsandbytes(bnb8_checkpoint: Path, tiny_text_checkpoint: Path,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import bitsandbytes.functional as bnb_functional

    checkpoint = Checkpoint.open(bnb8_checkpoint)
    source = weight_source(checkpoint)
    assert source.format == "bitsandbytes LLM.int8"
    modules = _quantized_modules(checkpoint)
    assert modules
    for module in modules:
        q, row_scale = checkpoint.read(f"{module}.weight"), checkpoint.read(f"{module}.SCB")
        assert q.dtype == torch.int8
        ours = source.dense(module)
        assert ours is not None and torch.equal(ours, bnb_functional.int8_vectorwise_dequant(q, row_scale))
        # bitsandbytes' documented arithmetic: w = q * SCB / 127, per output row
        assert torch.allclose(ours, q.float() * row_scale.view(-1, 1) / 127, rtol=1e-6, atol=0)
    report = tmp_path / "r.json"
    code, _, err = run_cli(["eval", str(bnb8_checkpoint), "--reference", str(tiny_text_checkpoint), "--samples", "4",
                            "--seq-len", "32", "--json", str(report)], capsys)
    assert code == 0, err
    assert 0 < json.loads(report.read_text())["kl"]["mean"] < 0.1  # int8: close to the bf16 model


def test_scoutq_run_generates_from_a_foreign_checkpoint(gptq_checkpoints: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["run", str(gptq_checkpoints["int4 g32 asym v1 desc_act"]), "--prompt", "The",
                              "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    assert out.strip()


# -- the runtime and the CLI on each format ----------------------------------------------------


@pytest.mark.parametrize("which", ["ct", "gptq", "awq", "bnb"])
def test_eval_judges_each_format_against_the_bf16_model(
    which: str, ct_checkpoints: dict[str, Path], gptq_checkpoints: dict[str, Path], awq_checkpoint: Path,
    bnb_checkpoint: Path, tiny_checkpoint: Path, tiny_text_checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    candidate, reference = {
        "ct": (ct_checkpoints["pack int4 g32 asym, actorder group + weight_g_idx"], tiny_checkpoint),
        "gptq": (gptq_checkpoints["int4 g32 sym v1"], tiny_checkpoint),
        "awq": (awq_checkpoint, tiny_checkpoint),
        "bnb": (bnb_checkpoint, tiny_text_checkpoint),
    }[which]
    report = tmp_path / "report.json"
    code, _, err = run_cli(["eval", str(candidate), "--reference", str(reference), "--samples", "4", "--seq-len", "32",
                            "--json", str(report)], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    kl = data["kl"]["mean"]
    assert math.isfinite(kl) and 0 < kl < 1.0, kl  # quantized, so not identical; a random tiny model, so loose
    assert 0.5 <= data["top1_agreement"] <= 1.0


def test_unsupported_field_is_one_line_naming_it(ct_checkpoints: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ct_checkpoints["pack int4 g32 sym, actorder static"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["block_structure"] = [128, 128]
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["eval", str(bad), "--samples", "2", "--seq-len", "16"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "config_groups.group_0.weights.block_structure = [128, 128] is not supported" in lines[0], lines[0]
    with pytest.raises(ConfigError, match=r"checkpoint_format = 'marlin'"):
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"] = _gptq_config(4, GROUP, True, False, True) | {"checkpoint_format": "marlin"}
        (bad / "config.json").write_text(json.dumps(config))
        weight_source(Checkpoint.open(bad))


# -- several candidates in one run -------------------------------------------------------------


def test_candidates_side_by_side_match_their_single_runs_and_pair_by_window(
    ct_checkpoints: dict[str, Path], gptq_checkpoints: dict[str, Path], awq_checkpoint: Path, tiny_checkpoint: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    candidates = [ct_checkpoints["pack int4 g32 sym, actorder static"], gptq_checkpoints["int4 g32 asym v1 desc_act"],
                  awq_checkpoint]
    window = ["--samples", "6", "--seq-len", "32", "--reference", str(tiny_checkpoint)]
    report, markdown = tmp_path / "judged.json", tmp_path / "judged.md"
    code, out, err = run_cli(["eval", *map(str, candidates), *window, "--json", str(report),
                              "--markdown", str(markdown)], capsys)
    assert code == 0, err
    judged = json.loads(report.read_text())
    assert [c["model"] for c in judged["candidates"]] == [str(c) for c in candidates]
    assert len(judged["pairwise_kl"]) == 3
    for pair in judged["pairwise_kl"]:
        first, second = (next(c for c in judged["candidates"] if c["model"] == pair[k]) for k in ("a", "b"))
        assert pair["kl_difference"] == pytest.approx(first["kl"]["mean"] - second["kl"]["mean"], rel=1e-9, abs=1e-12)
        assert pair["low"] <= pair["kl_difference"] <= pair["high"]
    for candidate in judged["candidates"]:
        assert candidate["bits_per_weight"] > 0 and candidate["size_bytes"] > 0
        single = tmp_path / f"{Path(candidate['model']).name}.json"
        code, _, err = run_cli(["eval", candidate["model"], *window, "--json", str(single)], capsys)
        assert code == 0, err
        alone = json.loads(single.read_text())
        assert alone["kl"] == candidate["kl"] and alone["top1_agreement"] == candidate["top1_agreement"]
    text = markdown.read_text()
    assert "Pairwise KL difference" in text and "GPTQ int4-g32" in text and "AWQ int4-g32" in text


def test_candidates_need_a_reference_and_one_line_otherwise(ct_checkpoints: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(p) for p in list(ct_checkpoints.values())[:2]]
    code, _, err = run_cli(["eval", *paths], capsys)
    assert code == 1 and "add --reference" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["eval", *paths, "--reference", paths[0], "--latency"], capsys)
    assert code == 1 and "--latency runs with one model" in err, err


def test_verify_foreign_decodes_every_linear_of_each_format(
    gptq_checkpoints: dict[str, Path], awq_checkpoint: Path, bnb_checkpoint: Path, ct_checkpoints: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    for path, fmt in ((gptq_checkpoints["int4 g32 asym v1 desc_act"], "GPTQ int4-g32"), (awq_checkpoint, "AWQ"),
                      (bnb_checkpoint, "bitsandbytes nf4"), (ct_checkpoints["naive int8 per-tensor"], "compressed-tensors")):
        code, out, err = run_cli(["verify", str(path), "--foreign", "--json"], capsys)
        assert code == 0, err
        checked = json.loads(out)
        assert checked["ok"] and checked["format"].startswith(fmt) and checked["quantized_modules"] > 0
        assert checked["quantized_routers"] == []


def test_verify_foreign_names_a_module_that_decodes_wrong(gptq_checkpoints: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(gptq_checkpoints["int4 g32 sym v1"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    victim = next(key for key in sorted(tensors) if key.endswith("experts.1.down_proj.scales"))
    tensors[victim][0, 0] = float("inf")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(["verify", str(bad), "--foreign"], capsys)
    assert code == 1 and "Traceback" not in err, err
    line = " ".join(err.split())
    assert victim.removesuffix(".scales") in line and "non-finite" in line, line


@pytest.mark.parametrize("damage", ["g_idx out of range", "qzeros cut short"])
def test_a_gptq_module_whose_tensors_disagree_is_one_line_naming_it(
    damage: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = "experts.1.down_proj"

    def tensors(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        stored = gptq_tensors(quantize(w, Scheme(4, GROUP, False), torch.float16), v1=True)
        if module.endswith(victim):
            if damage == "g_idx out of range":
                stored["g_idx"] = stored["g_idx"] + 100
            else:
                stored["qzeros"] = stored["qzeros"][:, :1].contiguous()
        return stored

    bad = write_foreign(tiny_checkpoint, tmp_path / "bad", _gptq_config(4, GROUP, False, False, True), tensors)
    for command in (["eval", str(bad), "--samples", "2", "--seq-len", "16"], ["verify", str(bad), "--foreign"]):
        code, _, err = run_cli(command, capsys)
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 1 and "Traceback" not in err and len(lines) == 1, err
        assert victim in lines[0] and "does not decode as GPTQ int4-g32" in lines[0], lines[0]
