"""scoutq's Llama 4 forward against transformers' on checkpoints transformers itself saved.

Each variant is a tiny random model built and saved by transformers (so the files are exactly
what HF writes), loaded by both, and run in fp32 on the same tokens. Requirement: logits
equal within 1e-4 max abs. Run this file as a script to print the variant table.
"""

from __future__ import annotations

import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import scoutq
from scoutq.fixtures.presets import SCOUT_ROPE

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
SEQ_LEN = 40  # longer than the chunk of 16: the chunked mask matters


@dataclass(frozen=True)
class Variant:
    name: str
    text: dict[str, Any] = field(default_factory=dict)
    multimodal: bool = False
    batch: int = 2
    attn_implementation: str = "eager"
    old_style_config: bool = False  # rewrite config.json the way transformers 4.5x saved it


BASE_TEXT: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 48,
    "intermediate_size_mlp": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "attention_chunk_size": 16,
    "floor_scale": 4,  # NoPE temperature > 1 from position 3 on
    "max_position_embeddings": 16384,
    "rope_parameters": dict(SCOUT_ROPE),
}

VARIANTS = [
    Variant("multimodal, top-1, all MoE", multimodal=True),
    Variant("text-only, top-1, all MoE"),
    Variant("text-only, top-2", text={"num_experts_per_tok": 2}),
    Variant("multimodal, top-2, 8 experts", text={"num_experts_per_tok": 2, "num_local_experts": 8}, multimodal=True),
    Variant("interleaved dense/MoE (step 2)", text={"interleave_moe_layer_step": 2}),
    Variant("GQA 8 q / 2 kv heads, no QK norm", text={"num_attention_heads": 8, "use_qk_norm": False}),
    Variant("MHA (kv = q heads), chunk 8", text={"num_key_value_heads": 4, "attention_chunk_size": 8}),
    Variant("llama3 rope with blend band", text={"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    Variant("default rope, 8 layers (2 NoPE)", text={"num_hidden_layers": 8, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0}}),
    Variant("temperature tuning off", text={"attn_temperature_tuning": False}),
    Variant("sdpa attention in transformers", attn_implementation="sdpa"),
    Variant("batch 1", batch=1),
    Variant("old-style config (int 4, rope_scaling, no no_rope_layers)", old_style_config=True),
]

VISION = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
    "projector_output_dim": 32,
}


def save_with_transformers(variant: Variant, directory: Path) -> None:
    """Build a random model with transformers and save it the way HF does."""
    text = {**BASE_TEXT, **variant.text}
    torch.manual_seed(zlib.crc32(variant.name.encode()))
    if variant.multimodal:
        config = transformers.Llama4Config(text_config=text, vision_config=VISION)
        model = transformers.Llama4ForConditionalGeneration(config)
    else:
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**text))
    # Random init of transformers leaves norms at 1; perturb them so a mix-up of norm weights shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    if variant.old_style_config:
        rewrite_as_old_config(directory / "config.json")


def rewrite_as_old_config(path: Path) -> None:
    """transformers 4.5x wrote attn_temperature_tuning=4, rope_scaling + rope_theta, and older
    configs lack no_rope_layers / layer_types (rebuilt from the interval of 4)."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["attn_temperature_tuning"] = 4
    for key in ("no_rope_layers", "layer_types", "moe_layers"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def max_abs_diff(variant: Variant, directory: Path) -> float:
    save_with_transformers(variant, directory)
    reference_dir = directory
    if variant.old_style_config:
        # transformers 5 rejects the integer 4; the reference reads a copy with the bool,
        # scoutq reads the old-style file as is.
        reference_dir = directory.with_name(directory.name + "-ref")
        reference_dir.mkdir()
        for item in directory.iterdir():
            (reference_dir / item.name).symlink_to(item.resolve())
        (reference_dir / "config.json").unlink()
        config = json.loads((directory / "config.json").read_text())
        config["attn_temperature_tuning"] = True
        (reference_dir / "config.json").write_text(json.dumps(config))
    reference = transformers.Llama4ForCausalLM.from_pretrained(
        reference_dir, dtype=torch.float32, attn_implementation=variant.attn_implementation
    ).eval()
    ours = scoutq.load_model(directory, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, BASE_TEXT["vocab_size"], (variant.batch, SEQ_LEN), generator=generator)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_logits_match_transformers(variant: Variant, tmp_path: Path) -> None:
    diff = max_abs_diff(variant, tmp_path / "ckpt")
    assert diff <= TOLERANCE, f"{variant.name}: max abs logit difference {diff:.3g} > {TOLERANCE}"


def test_kv_cache_decode_matches_full_forward(tmp_path: Path) -> None:
    """Prefill then one token at a time through the cache equals one full forward pass."""
    variant = Variant("cache", text={"num_experts_per_tok": 2})
    save_with_transformers(variant, tmp_path / "ckpt")
    model = scoutq.load_model(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, BASE_TEXT["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, SEQ_LEN)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOLERANCE


if __name__ == "__main__":  # print the equivalence table
    import tempfile

    print(f"{'variant':60s} max abs diff (fp32 logits, {SEQ_LEN} tokens)")
    for v in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{v.name:60s} {max_abs_diff(v, Path(tmp) / 'ckpt'):.2e}")
    sys.exit(0)
