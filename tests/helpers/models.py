"""Models for tests: a small random Llama 4 module (no checkpoint needed), and the resident
model's per-layer trace of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from scoutq.checkpoint.config import parse_text_config
from scoutq.fixtures import presets
from scoutq.model.llama4 import Llama4ForCausalLM
from scoutq.model.load import load_model


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


def resident_trace(path: Path, windows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each decoder layer's output, each MoE router's logits and the logits of the resident fp32
    model of checkpoint `path` on token windows [S, T]: what the layer stream must reproduce."""
    model = load_model(path, dtype=torch.float32)
    outputs: list[torch.Tensor] = []
    routers: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in model.layers]
    hooks += [layer.feed_forward.router.register_forward_hook(lambda _m, _i, out: routers.append(out))
              for layer in model.layers if layer.is_moe]
    with torch.inference_mode():
        logits = model(windows)
    for hook in hooks:
        hook.remove()
    return outputs, routers, logits
