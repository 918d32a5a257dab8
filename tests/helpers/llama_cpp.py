"""llama-cpp-python, quietly: a model with logits for every position and an fp32 KV cache."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np


@llama_cpp.llama_log_callback
def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))  # the module keeps _silent referenced
GGML_TYPE_F32 = 0


@contextmanager
def llama(path: Path, context: int = 512) -> Iterator[llama_cpp.Llama]:
    """llama.cpp on `path`: every position's logits kept, KV cache in fp32 (its default fp16 cache
    alone moves logits by ~1e-2), two threads."""
    model = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=min(context, 2048), logits_all=True,
                            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=2, n_threads_batch=2, verbose=False)
    try:
        yield model
    finally:
        model.close()


def logits(model: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    model.reset()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)


def greedy(model: llama_cpp.Llama, prompt: list[int], count: int) -> list[int]:
    """`count` tokens by argmax, no sampler and no stop token: the same rule as scoutq run."""
    model.reset()
    model.eval(prompt)
    produced: list[int] = []
    for _ in range(count):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        produced.append(token)
        model.eval([token])
    return produced


def tokenize(path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization with the file's own vocabulary and BOS rule."""
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        model.close()
