"""scoutq.evaluate.latency: figures from a tiny random MoE, the cached path it times, weight bytes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.models import random_tiny_model
from torch import nn

import scoutq
from scoutq.errors import ScoutqError
from scoutq.evaluate import latency
from scoutq.evaluate.latency import LatencyReport, measure_latency, weight_bytes
from scoutq.model.llama4 import Llama4ForCausalLM

VOCAB = 64


def tiny_model(seed: int = 0) -> Llama4ForCausalLM:
    return random_tiny_model(VOCAB, seed=seed)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on two threads of two shared cores wait ~10 ms per parallel region for the
    second core (tests/pipeline/test_consumers.py); one thread keeps these runs to milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> Llama4ForCausalLM:
    return tiny_model()


def test_report_figures_are_positive_and_finite(model: Llama4ForCausalLM) -> None:
    report = measure_latency(model, VOCAB, prompt_len=16, decode_tokens=4, batches=(1, 2))
    assert isinstance(report, LatencyReport)
    assert (report.prompt_len, report.decode_tokens) == (16, 4)
    for value in (report.prefill_tokens_per_s, report.time_to_first_token_s):
        assert math.isfinite(value) and value > 0
    # The first token is the prefill plus its argmax, so it cannot come before the prefill ends.
    assert report.time_to_first_token_s >= 16 / report.prefill_tokens_per_s
    assert set(report.decode) == {1, 2}
    for batch, figures in report.decode.items():
        assert set(figures) == {"tokens_per_s", "ms_per_step"}
        assert all(math.isfinite(v) and v > 0 for v in figures.values())
        assert figures["tokens_per_s"] == pytest.approx(batch * 1000.0 / figures["ms_per_step"])
    assert report.peak_rss_bytes > 0 and report.rss_bytes is not None and report.rss_bytes > 0
    assert report.gpu_peak_bytes is None
    assert report.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert (report.device, report.dtype, report.threads) == ("cpu", "float32", 1)

    data = json.loads(json.dumps(report.to_json()))
    assert set(data["decode"]) == {"1", "2"}
    assert data["decode"]["2"] == report.decode[2]
    assert {f.name for f in report.__dataclass_fields__.values()} == set(data)


def test_no_warmup_is_allowed(model: Llama4ForCausalLM) -> None:
    report = measure_latency(model, VOCAB, prompt_len=4, decode_tokens=1, batches=(1,), warmup=0)
    assert set(report.decode) == {1}


def test_cached_decode_matches_full_recompute(model: Llama4ForCausalLM) -> None:
    """The timed path (prefill, then cached single-token steps) is greedy decoding done right."""
    prompts = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    steps = 4  # 30 + 4 crosses the tiny config's attention chunk of 32
    with torch.inference_mode():
        _, tokens = latency._decode(model, model.new_cache, prompts, steps, lambda: None)
        assert tokens.shape == (2, steps + 1)
        sequence = prompts
        for step in range(steps + 1):
            logits = model(sequence)[:, -1]  # no cache: the whole sequence again
            top2 = logits.topk(2, dim=-1).values
            assert bool(((top2[:, 0] - top2[:, 1]) > 1e-4).all()), "near-tie: fp32 argmax is not decisive"
            assert torch.equal(logits.argmax(-1), tokens[:, step]), f"step {step}"
            sequence = torch.cat((sequence, tokens[:, step : step + 1]), dim=1)


def test_weight_bytes_counts_parameters_and_shared_storage_once() -> None:
    plain = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8, bias=False).to(torch.bfloat16))
    assert weight_bytes(plain) == (8 * 4 + 4) * 4 + 4 * 8 * 2

    tied = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    tied[1].weight = tied[0].weight
    tied.register_buffer("packed", torch.zeros(3, 5, dtype=torch.int32))
    tied.register_buffer("view", tied.packed[1:])  # a view of the same storage
    assert weight_bytes(tied) == 10 * 6 * 4 + 3 * 5 * 4


def test_weight_bytes_of_a_quantized_model_counts_packed_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from scoutq.cli.app import main

    out = tmp_path / "w4"
    try:
        main(["quantize", str(tiny_checkpoint), "--recipe", "w4a16-g128", "--out", str(out)])
    except SystemExit as done:
        assert done.code in (0, None)
    dense = scoutq.load_model(tiny_checkpoint, dtype=torch.bfloat16)
    quantized = scoutq.load_model(out, dtype=torch.bfloat16, backend="reference")
    visible = sum(t.numel() * t.element_size() for t in [*quantized.parameters(), *quantized.buffers()])
    # Packed weights live in kernel objects, not parameters; int4 is about a quarter of bf16.
    assert visible < weight_bytes(quantized) < weight_bytes(dense)

    report = measure_latency(quantized, dense.config.vocab_size, prompt_len=8, decode_tokens=2, batches=(1,), warmup=0)
    assert report.weight_bytes == weight_bytes(quantized) and report.dtype == "bfloat16"
    assert report.decode[1]["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vocab_size": 0},
        {"prompt_len": 0},
        {"decode_tokens": -1},
        {"prompt_len": 2.5},
        {"decode_tokens": True},
        {"batches": ()},
        {"batches": (1, 0)},
        {"warmup": -1},
    ],
)
def test_bad_arguments_raise_scoutq_error(model: Llama4ForCausalLM, kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"vocab_size": VOCAB, "prompt_len": 4, "decode_tokens": 1, "batches": (1,)}
    with pytest.raises(ScoutqError):
        measure_latency(model, **{**arguments, **kwargs})  # type: ignore[arg-type]


def test_model_without_a_cache_is_rejected() -> None:
    with pytest.raises(ScoutqError, match="new_cache"):
        measure_latency(nn.Linear(4, 4), VOCAB)
