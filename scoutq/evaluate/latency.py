"""Latency and memory of a resident model, for `scoutq eval --latency`: no tokenizer needed.

Prompts are random token ids from a seeded generator, so two runs feed the same ids. Every
figure comes from the same path generation uses (scoutq.model.generate): one prefill forward
with a fresh KV cache, then single-token greedy steps that extend the cache.

    prefill tokens/s    = prompt_len / prefill seconds                  (batch 1)
    time to first token = prefill seconds + argmax of the last logits, on the host  (batch 1)
    decode tokens/s     = B * decode_tokens / decode seconds            (each batch size B)

Timing is wall clock (time.perf_counter), after `warmup` untimed runs of the whole procedure;
on CUDA the device is synchronised before each clock read, so queued kernels are counted.
Memory figures are the process's so far (peak RSS, and CUDA's peak allocation), so they include
loading the model and every run here, warm-up included.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from scoutq.errors import ScoutqError

_MAX_ATTRIBUTE_DEPTH = 4  # QuantLinear -> matmul -> PackedWeight -> tensor, with one level to spare


@dataclass
class LatencyReport:
    """What `measure_latency` measured. Rates are per second, memory in bytes.

    `decode` maps each batch size B to {"tokens_per_s": B * steps / s, "ms_per_step": ms}.
    `gpu_peak_bytes` is None when the model is not on a CUDA device.
    """

    prompt_len: int
    decode_tokens: int
    prefill_tokens_per_s: float
    time_to_first_token_s: float
    decode: dict[int, dict[str, float]]
    peak_rss_bytes: int
    rss_bytes: int  # resident set at the end of the measurement
    gpu_peak_bytes: int | None
    weight_bytes: int
    device: str
    dtype: str  # e.g. "bfloat16"
    threads: int  # torch.get_num_threads()

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict: the fields as they are, except that the batch-size
        keys of `decode` become strings ("1", "4", ...), since JSON object keys are strings."""
        data = dataclasses.asdict(self)
        data["decode"] = {str(batch): dict(figures) for batch, figures in self.decode.items()}
        return data


def measure_latency(
    model: nn.Module,
    vocab_size: int,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    batches: tuple[int, ...] = (1, 4, 16),
    warmup: int = 1,
    seed: int = 0,
) -> LatencyReport:
    """Time prefill, first token and cached decoding of a scoutq Llama 4 model on random ids.

    Definitions (all at batch 1 unless said otherwise; a fresh KV cache for every run):

    * prefill: one forward over `prompt_len` tokens, from the call until the logits are
      computed (device synchronised). prefill tokens/s = prompt_len / that time.
    * time to first token: the same clock, stopped once the greedy first token (argmax of the
      last position's logits) is a Python int on the host, i.e. prefill plus that argmax and
      its device-to-host copy. No decode step is included: the first token comes out of the
      prefill.
    * decode at batch B: after an untimed prefill of B prompts, `decode_tokens` steps that each
      feed the previous greedy tokens [B, 1] and take the argmax of the new logits (kept on the
      device). tokens/s = B * decode_tokens / time; ms_per_step = 1000 * time / decode_tokens.

    Args:
        model: a scoutq `Llama4ForCausalLM` (bf16 or quantized, from `load_model`), in eval
            mode; it is not modified. Inputs go to the device of its first parameter.
        vocab_size: random ids are drawn uniformly from [0, vocab_size).
        prompt_len: prompt tokens per sequence.
        decode_tokens: cached single-token steps timed per batch size.
        batches: batch sizes to time decoding at.
        warmup: untimed runs of the whole procedure before the timed one (0 allowed).
        seed: seed of the generator that draws the prompts.

    Returns:
        A `LatencyReport`.

    Raises:
        ScoutqError: a non-positive size, an empty `batches`, a negative `warmup`, or a model
            without parameters or without `new_cache()`.
    """
    for name, value in (("vocab_size", vocab_size), ("prompt_len", prompt_len), ("decode_tokens", decode_tokens)):
        _check_positive(name, value)
    if not batches:
        raise ScoutqError("batches is empty; give at least one batch size, e.g. (1, 4, 16)")
    for batch in batches:
        _check_positive("each batch size", batch)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ScoutqError(f"warmup must be a non-negative int, got {warmup!r}")
    new_cache = getattr(model, "new_cache", None)
    if not callable(new_cache):
        raise ScoutqError(f"expected a scoutq Llama4ForCausalLM (with new_cache()), got {type(model).__name__}")
    device, dtype = _device_and_dtype(model)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    generator = torch.Generator().manual_seed(seed)
    prompts = {batch: torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).to(device)
               for batch in sorted({1, *batches})}

    with torch.inference_mode():
        for _ in range(warmup):
            _first_token(model, new_cache, prompts[1], sync)
            for batch in batches:
                _decode(model, new_cache, prompts[batch], decode_tokens, sync)
        prefill_s, first_token_s = _first_token(model, new_cache, prompts[1], sync)
        decode: dict[int, dict[str, float]] = {}
        for batch in batches:
            seconds, _ = _decode(model, new_cache, prompts[batch], decode_tokens, sync)
            decode[batch] = {"tokens_per_s": batch * decode_tokens / seconds,
                             "ms_per_step": 1000.0 * seconds / decode_tokens}

    return LatencyReport(
        prompt_len=prompt_len,
        decode_tokens=decode_tokens,
        prefill_tokens_per_s=prompt_len / prefill_s,
        time_to_first_token_s=first_token_s,
        decode=decode,
        peak_rss_bytes=peak_rss_bytes(),
        rss_bytes=current_rss_bytes(),
        gpu_peak_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        weight_bytes=weight_bytes(model),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
    )


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ScoutqError(f"{name} must be a positive int, got {value!r}")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the first parameter, and the dtype of the first floating-point one
    (the embedding's in a scoutq model: the activation dtype, quantized or not)."""
    params = list(model.parameters())
    if not params:
        raise ScoutqError(f"{type(model).__name__} has no parameters; load a model first")
    floating = [p.dtype for p in params if p.is_floating_point()]
    return params[0].device, floating[0] if floating else params[0].dtype


def _clock(sync: Callable[[], None]) -> float:
    sync()
    return time.perf_counter()


def _first_token(model: nn.Module, new_cache: Callable[[], Any], prompt: torch.Tensor,
                 sync: Callable[[], None]) -> tuple[float, float]:
    """(prefill seconds, time-to-first-token seconds) of one prompt [1, T]."""
    cache = new_cache()
    start = _clock(sync)
    logits = model(prompt, cache)
    prefilled = _clock(sync)
    int(logits[0, -1].argmax())  # the first token, on the host
    return prefilled - start, time.perf_counter() - start


def _decode(model: nn.Module, new_cache: Callable[[], Any], prompts: torch.Tensor, steps: int,
            sync: Callable[[], None]) -> tuple[float, torch.Tensor]:
    """Seconds for `steps` greedy cached steps after an untimed prefill of prompts [B, T], and
    the greedy tokens [B, steps + 1] (the prefill's first, then one per step)."""
    cache = new_cache()
    tokens = [model(prompts, cache)[:, -1].argmax(-1, keepdim=True)]  # [B, 1] each
    start = _clock(sync)
    for _ in range(steps):
        tokens.append(model(tokens[-1], cache)[:, -1].argmax(-1, keepdim=True))
    return _clock(sync) - start, torch.cat(tokens, dim=1)


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (getrusage: KiB on Linux, bytes on macOS).

    Not psutil: its memory_info() is the resident set now, with a high-water mark only on
    Windows; the kernel's ru_maxrss is the peak on Linux and macOS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """The process's resident set now."""
    return int(psutil.Process().memory_info().rss)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, each storage counted once.

    Tensors are de-duplicated by (device, storage data_ptr), so tied or shared weights and views
    of one storage count once, at the storage's size; packed int32 weights count at their stored
    size. scoutq's quantized modules keep their packed weights in kernel objects (QuantLinear's
    `matmul`, QuantExperts' lists), which are neither parameters nor buffers; tensors reachable
    from module attributes through such plain objects, lists and dicts are counted too.
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _weights(model):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        # Meta and empty tensors have no data pointer; key them by identity instead.
        key = (str(tensor.device), pointer) if pointer else ("id", id(tensor))
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    visited: set[int] = set()
    for module in model.modules():
        for name, value in vars(module).items():
            if not name.startswith("_"):  # _parameters, _buffers, _modules: already walked
                yield from _attached(value, _MAX_ATTRIBUTE_DEPTH, visited)


def _attached(value: object, depth: int, visited: set[int]) -> Iterator[torch.Tensor]:
    """Tensors held by a plain attribute value: tensors, modules, lists, dicts, objects' vars."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    if isinstance(value, nn.Module):  # a module held outside _modules, e.g. bitsandbytes' layer
        yield from value.parameters()
        yield from value.buffers()
        return
    if depth == 0 or id(value) in visited or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return
    visited.add(id(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items: Any = value
    elif isinstance(value, dict):
        items = value.values()
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        items = vars(value).values()
    else:
        return
    for item in items:
        yield from _attached(item, depth - 1, visited)
