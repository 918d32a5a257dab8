"""Greedy generation with the KV cache, timed: prefill once, then one token per step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from scoutq.model.llama4 import Llama4ForCausalLM


@dataclass
class Generation:
    tokens: list[int]  # the generated tokens only
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.tokens) - 1, 0)  # the first token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@torch.no_grad()
def greedy_generate(model: Llama4ForCausalLM, prompt: list[int], max_new_tokens: int,
                    stop: set[int] | None = None) -> Generation:
    device = model.embed_tokens.weight.device
    cache = model.new_cache()
    start = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), cache)
    token = int(logits[0, -1].argmax())
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    while len(tokens) < max_new_tokens and not (stop and token in stop):
        logits = model(torch.tensor([[token]], device=device), cache)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    return Generation(tokens, len(prompt), prefill, time.perf_counter() - start)
