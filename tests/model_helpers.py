"""A small random Llama 4 module for tests that need a model but no checkpoint."""

from __future__ import annotations

import torch

from scoutq.fixtures import presets
from scoutq.model.config import parse_text_config
from scoutq.model.llama4 import Llama4ForCausalLM


def random_tiny_model(vocab: int, top_k: int = 1, seed: int = 0) -> Llama4ForCausalLM:
    """A random 4-layer, 4-expert Llama 4 in fp32, weights N(0, 0.05) from a seeded generator."""
    raw = presets.tiny_text_config(vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, num_experts_per_tok=top_k)
    model = Llama4ForCausalLM(parse_text_config(raw))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.05, generator=generator)
    return model.eval()
