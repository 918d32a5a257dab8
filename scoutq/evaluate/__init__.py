"""Evaluation: how far a quantized model drifts from its reference, on held-out text.

Perplexity alone is a noisy, one-number summary (field-notes G: with ~12K tokens the ranking
of int4 methods moves with noise), so a comparison also reports llama.cpp's token-level
statistics, KL divergence from the reference and same-top-token agreement, and, for MoE,
how often each layer's router still picks the same experts. Every interval treats windows,
not tokens, as the independent samples.

* metrics.py: pure tensor functions (NLL, KL, agreement, intervals).
* windows.py: the evaluation text as [W, T] token windows of the checkpoint's tokenizer.
* compare.py: `compare_models`, both models resident, batch by batch.
"""

from scoutq.evaluate.compare import Comparison, RouterHooks, compare_models
from scoutq.evaluate.metrics import (
    Perplexity,
    kl_divergence,
    perplexity_with_interval,
    routing_agreement,
    summarize_kl,
    token_log_probs,
    top1_agreement,
)
from scoutq.evaluate.windows import evaluation_windows

__all__ = [
    "Comparison",
    "Perplexity",
    "RouterHooks",
    "compare_models",
    "evaluation_windows",
    "kl_divergence",
    "perplexity_with_interval",
    "routing_agreement",
    "summarize_kl",
    "token_log_probs",
    "top1_agreement",
]
