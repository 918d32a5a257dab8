"""Fixture checkpoints are in the exact Hugging Face layout, and Scout-shaped where they claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from scoutq.checkpoint import Checkpoint
from scoutq.checkpoint.layout import MULTIMODAL, expected_text_shapes
from scoutq.fixtures import presets
from scoutq.fixtures.corpus import builtin_corpus, split_documents
from scoutq.fixtures.random_presets import build_scout_layers, build_tiny, scout_layers_bytes
from scoutq.fixtures.weights import checkpoint_specs
from scoutq.model.config import parse_text_config

transformers = pytest.importorskip("transformers")


def stored_keys(directory: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            shapes |= {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return shapes


@pytest.mark.parametrize("multimodal", [True, False], ids=["multimodal", "text-only"])
def test_tensor_list_matches_what_transformers_saves(multimodal: bool, tmp_path: Path) -> None:
    """Our key list and shapes for a config equal those of transformers' own save of that config."""
    text = presets.tiny_text_config(512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    ours = presets.multimodal_config(text, presets.tiny_vision_config()) if multimodal else presets.text_only_config(text)
    if multimodal:
        hf_config = transformers.Llama4Config(
            text_config={k: v for k, v in text.items() if k != "model_type"},
            vision_config={k: v for k, v in presets.tiny_vision_config().items() if k != "model_type"},
        )
        model = transformers.Llama4ForConditionalGeneration(hf_config)
    else:
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{k: v for k, v in text.items() if k != "model_type"}))
    model.save_pretrained(tmp_path)
    assert {spec.name: spec.shape for spec in checkpoint_specs(ours)} == stored_keys(tmp_path)


def test_transformers_loads_tiny_fixture_without_missing_weights(tiny_checkpoint: Path) -> None:
    model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_fixture_files_are_the_hf_set(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards == {n for n in names if n.endswith(".safetensors")}
    assert not any(n.endswith(".partial") for n in names)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    config = json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]
    assert tokenizer("hello world").input_ids[0] == config["bos_token_id"]


def test_random_fixture_is_deterministic(tmp_path: Path) -> None:
    a, b = build_tiny(tmp_path / "a", seed=3), build_tiny(tmp_path / "b", seed=3)
    c = build_tiny(tmp_path / "c", seed=4)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert all((a / s).read_bytes() == (b / s).read_bytes() for s in shards)
    assert any((a / s).read_bytes() != (c / s).read_bytes() for s in shards)


def test_scout_layers_has_real_scout_shapes() -> None:
    config_json = presets.multimodal_config(presets.scout_text_config(2), presets.scout_vision_config())
    config = parse_text_config(config_json)
    shapes = expected_text_shapes(config, MULTIMODAL)
    layer = "language_model.model.layers.1."
    assert shapes["language_model.model.embed_tokens.weight"] == (202048, 5120)
    assert shapes["language_model.lm_head.weight"] == (202048, 5120)
    assert shapes[layer + "self_attn.q_proj.weight"] == (5120, 5120)
    assert shapes[layer + "self_attn.k_proj.weight"] == (1024, 5120)
    assert shapes[layer + "feed_forward.router.weight"] == (16, 5120)
    assert shapes[layer + "feed_forward.experts.gate_up_proj"] == (16, 5120, 16384)
    assert shapes[layer + "feed_forward.experts.down_proj"] == (16, 8192, 5120)
    assert shapes[layer + "feed_forward.shared_expert.down_proj.weight"] == (5120, 8192)
    per_layer = scout_layers_bytes(2) - scout_layers_bytes(1)
    assert 4.3e9 < per_layer < 4.5e9  # the "about 4.3 GB per layer" of bf16


def test_corpus_splits_share_no_document() -> None:
    corpus = builtin_corpus()
    train, calibration, evaluation = map(set, (corpus.train, corpus.calibration, corpus.evaluation))
    assert train and calibration and evaluation
    assert not (train & calibration or train & evaluation or calibration & evaluation)
    total = sum(map(len, corpus.train + corpus.calibration + corpus.evaluation))
    assert sum(map(len, corpus.evaluation)) >= 0.15 * total


def test_single_user_file_is_split_by_paragraph() -> None:
    text = "\n\n".join(f"paragraph {i} " * 20 for i in range(40))
    corpus = split_documents({"notes.txt": text}, "notes.txt")
    assert corpus.train and corpus.calibration and corpus.evaluation


@pytest.mark.slow
def test_scout_layers_fixture_builds_and_reads(tmp_path: Path) -> None:
    out = build_scout_layers(tmp_path / "scout-1", layers=1)
    checkpoint = Checkpoint.open(out)
    checkpoint.validate_shapes()
    gate = checkpoint.read_expert(0, 15, "gate")
    assert gate.shape == (8192, 5120) and gate.dtype == torch.bfloat16
    assert 0.015 < gate.float().std().item() < 0.025
