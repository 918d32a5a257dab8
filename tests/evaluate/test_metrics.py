"""scoutq.evaluate: metrics against hand-computed values, windows, and compare_models on a tiny random MoE."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.models import random_tiny_model
from tokenizers import Tokenizer

from scoutq.data.corpus import builtin_corpus
from scoutq.data.tokens import token_stream
from scoutq.errors import ScoutqError
from scoutq.evaluate import (
    compare_models,
    evaluation_windows,
    kl_divergence,
    metrics,
    perplexity_with_interval,
    routing_agreement,
    summarize_kl,
    token_log_probs,
    top1_agreement,
)
from scoutq.evaluate.metrics import Z95
from scoutq.evaluate.report import perplexity_gap_interval
from scoutq.fixtures.tokenizer import BOS, save_tokenizer, train_tokenizer
from scoutq.model.llama4 import Llama4ForCausalLM
from scoutq.model.moe import MoE

VOCAB = 64


# --- metrics -------------------------------------------------------------------------------------


def test_uniform_logits_give_perplexity_equal_to_vocab() -> None:
    logits = torch.zeros(10, VOCAB, dtype=torch.bfloat16)
    nll = token_log_probs(logits, torch.arange(10))
    assert nll.dtype == torch.float64
    torch.testing.assert_close(nll, torch.full((10,), math.log(VOCAB), dtype=torch.float64))
    ppl = perplexity_with_interval(nll.view(5, 2).mean(dim=1), 2)
    assert ppl.value == pytest.approx(VOCAB, rel=1e-12)
    assert ppl.low == pytest.approx(VOCAB, rel=1e-12) and ppl.high == pytest.approx(VOCAB, rel=1e-12)


def test_token_log_probs_known_value() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])  # p = [1/4, 3/4]
    nll = token_log_probs(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(nll, torch.tensor([math.log(4 / 3), math.log(4.0)], dtype=torch.float64))


def test_identical_logits_have_zero_kl_and_full_agreement() -> None:
    logits = torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kl_divergence(logits, logits.clone()), torch.zeros(7, dtype=torch.float64))
    assert bool(top1_agreement(logits, logits.clone()).all())


def test_kl_two_token_vocabulary_known_values() -> None:
    half = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # p = [1/2, 1/2]
    skewed = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # q = [3/4, 1/4]
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(kl_divergence(half, skewed)[0]) == pytest.approx(expected, rel=1e-12)
    # The other direction is a different number: KL(P_ref || P_cand) is not symmetric.
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kl_divergence(skewed, half)[0]) == pytest.approx(reverse, rel=1e-12)
    # A reference with a zero-probability token adds nothing for it (no 0 * -inf = NaN).
    certain = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)
    assert float(kl_divergence(certain, half)[0]) == pytest.approx(math.log(2.0), rel=1e-12)


def test_row_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp64 work runs in row chunks (for 200k-token vocabularies); force chunks of 2 rows."""
    generator = torch.Generator().manual_seed(3)
    ref, cand = torch.randn(7, VOCAB, generator=generator), torch.randn(7, VOCAB, generator=generator)
    targets = torch.randint(0, VOCAB, (7,), generator=generator)
    whole_nll, whole_kl = token_log_probs(cand, targets), kl_divergence(ref, cand)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 2 * VOCAB)
    assert torch.equal(token_log_probs(cand, targets), whole_nll)
    assert torch.equal(kl_divergence(ref, cand), whole_kl)


def test_top1_agreement_per_token() -> None:
    ref = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cand = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert top1_agreement(ref, cand).tolist() == [True, False, True]


def test_perplexity_interval_hand_computed() -> None:
    # Window means 1 and 3 nats, equal tokens: m = 2, se^2 = 2/1 * (1/4 + 1/4) = 1.
    ppl = perplexity_with_interval([1.0, 3.0], 10)
    assert ppl.value == pytest.approx(math.exp(2.0))
    assert (ppl.low, ppl.high) == pytest.approx((math.exp(2.0 - Z95), math.exp(2.0 + Z95)))
    # Token-weighted: 3 tokens at 1 nat and 1 token at 3 nats -> 1.5 nats per token.
    weighted = perplexity_with_interval(torch.tensor([1.0, 3.0]), [3, 1])
    assert weighted.value == pytest.approx(math.exp(1.5))
    single = perplexity_with_interval([2.0], 5)
    assert single.value == pytest.approx(math.exp(2.0)) and math.isnan(single.low) and math.isnan(single.high)


def test_perplexity_interval_contains_estimate_and_shrinks() -> None:
    pattern = [2.0, 2.5, 3.1, 2.2, 2.7]
    few = perplexity_with_interval(pattern, 100)
    many = perplexity_with_interval(pattern * 20, 100)
    for ppl in (few, many):
        assert ppl.low < ppl.value < ppl.high
    assert many.value == pytest.approx(few.value)
    assert many.high - many.low < 0.5 * (few.high - few.low)


def test_summarize_kl_hand_computed() -> None:
    summary = summarize_kl(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    half = Z95 * math.sqrt(2.5 / 5)  # sample variance 2.5 over 5 tokens
    assert summary == pytest.approx(
        {"mean": 2.0, "mean_low": 2.0 - half, "mean_high": 2.0 + half, "median": 2.0, "p99": 3.96, "max": 4.0}
    )
    # Windows as units: two windows of three tokens, means 1 and 4 -> se = 1.5.
    by_window = summarize_kl(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), window=3)
    assert by_window["mean"] == pytest.approx(2.5)
    assert (by_window["mean_low"], by_window["mean_high"]) == pytest.approx((2.5 - Z95 * 1.5, 2.5 + Z95 * 1.5))
    assert by_window["median"] == pytest.approx(2.5)


def test_routing_agreement_crafted() -> None:
    top1_ref, top1_cand = torch.tensor([[0], [1], [2], [3]]), torch.tensor([[0], [1], [3], [3]])
    assert routing_agreement(top1_ref, top1_cand) == 0.75
    # Top-2: the set counts, not the order ([0, 1] == [1, 0]); [2, 3] vs [2, 1] differs.
    ref, cand = torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.tensor([[1, 0], [2, 1], [1, 0]])
    assert routing_agreement(ref, cand) == pytest.approx(2 / 3)
    assert routing_agreement(ref, ref) == 1.0
    with pytest.raises(ValueError):
        routing_agreement(ref, top1_ref)


# --- windows -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(builtin_corpus().train, 300), directory, max_length=1024)
    return directory


def test_windows_are_the_stream_cut_without_overlap(tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    stream = token_stream(tokenizer, builtin_corpus().evaluation)
    windows = evaluation_windows(tokenizer_dir, 64, None)
    assert windows.dtype == torch.int64 and windows.shape == (stream.numel() // 64, 64)
    assert torch.equal(windows.flatten(), stream[: windows.numel()])
    assert int(windows[0, 0]) == tokenizer.token_to_id(BOS)
    first = evaluation_windows(tokenizer_dir, 64, 3)
    assert torch.equal(first, windows[:3])
    assert evaluation_windows(tokenizer_dir, 64, 10**9).shape == windows.shape  # all there is


def test_windows_from_given_texts_and_too_little_text(tokenizer_dir: Path) -> None:
    texts = ["def f(x):\n    return x + 1\n" * 20, "The while statement repeats. " * 20]
    windows = evaluation_windows(tokenizer_dir, 16, None, texts=texts)
    assert windows.shape[1] == 16 and windows.shape[0] >= 2
    with pytest.raises(ScoutqError, match=r"has \d+ tokens, fewer than one window of 4096"):
        evaluation_windows(tokenizer_dir, 4096, None, texts=["too short"])
    with pytest.raises(ScoutqError, match="tokenizer.json"):
        evaluation_windows(tokenizer_dir / "missing", 16, None)


# --- compare_models ------------------------------------------------------------------------------


def tiny_model(top_k: int = 1, seed: int = 0) -> Llama4ForCausalLM:
    return random_tiny_model(VOCAB, top_k, seed)


def random_windows(count: int = 6, length: int = 40) -> torch.Tensor:
    # 40 > the tiny config's attention chunk of 32, so chunked attention is part of the test.
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("top_k", [1, 2])
def test_model_against_itself(top_k: int) -> None:
    model, windows = tiny_model(top_k), random_windows()
    done: list[int] = []
    result = compare_models(model, model, windows, batch_size=4, on_batch=done.append)
    assert done == [4, 6]
    assert (result.windows, result.tokens_scored) == (6, 6 * 39)
    assert result.kl is not None and result.kl["mean"] == 0.0 and result.kl["max"] == 0.0
    assert result.top1_agreement == 1.0
    assert result.moe_layers == [0, 1, 2, 3]
    assert result.routing_agreement == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert result.reference_perplexity == result.perplexity
    assert result.expert_counts.shape == (4, 4)
    assert result.expert_counts.sum(dim=1).tolist() == [6 * 39 * top_k] * 4
    assert torch.equal(result.expert_counts, result.reference_expert_counts)


def test_perplexity_matches_direct_cross_entropy() -> None:
    model, windows = tiny_model(), random_windows()
    result = compare_models(model, None, windows, batch_size=4)
    with torch.inference_mode():
        logits = model(windows[:, :-1]).double()
    direct = math.exp(float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())))
    assert result.perplexity.value == pytest.approx(direct, rel=1e-6)
    assert result.perplexity.low < result.perplexity.value < result.perplexity.high
    assert result.kl is None and result.top1_agreement is None and result.routing_agreement is None
    assert result.reference_perplexity is None and result.reference_expert_counts is None
    assert result.expert_counts.sum(dim=1).tolist() == [6 * 39] * 4


def test_perturbed_router_changes_routing_and_distribution() -> None:
    reference, windows = tiny_model(), random_windows()
    candidate = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in candidate.modules():
            if isinstance(module, MoE):
                module.router.weight.add_(torch.randn(module.router.weight.shape, generator=generator) * 0.1)
    result = compare_models(candidate, reference, windows, batch_size=8)
    assert result.routing_agreement is not None and result.kl is not None
    assert all(0.0 <= share < 1.0 for share in result.routing_agreement.values())
    assert result.kl["mean"] > 0.0 and result.kl["mean_low"] < result.kl["mean"] < result.kl["mean_high"]
    assert result.top1_agreement is not None and result.top1_agreement <= 1.0
    assert not torch.equal(result.expert_counts, result.reference_expert_counts)


def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ScoutqError, match="vocabulary"):
        compare_models(tiny_model(), None, torch.full((2, 8), VOCAB))


def test_perplexity_gap_interval_is_paired_by_window() -> None:
    # Windows of very different difficulty, with the candidate a near-constant 1% worse on each:
    # the paired interval is narrow and around +1%, although each perplexity's interval is wide.
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(64, generator=generator, dtype=torch.float64) * 3 + 1
    shift = math.log(1.01) + torch.randn(64, generator=generator, dtype=torch.float64) * 1e-3
    low, high = perplexity_gap_interval(reference + shift, reference)
    differences = shift.numpy()
    half = Z95 * differences.std(ddof=1) / math.sqrt(64)
    assert low == pytest.approx(100 * math.expm1(differences.mean() - half), rel=1e-9)
    assert high == pytest.approx(100 * math.expm1(differences.mean() + half), rel=1e-9)
    assert 0.9 < low < 1.0 < high < 1.1
    assert perplexity_gap_interval(reference, reference) == [0.0, 0.0]
    assert perplexity_gap_interval(reference[:1], reference[:1]) is None
