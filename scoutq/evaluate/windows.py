"""Evaluation text as token windows, encoded with the checkpoint's own tokenizer.

The builtin corpus's `evaluation` split shares no topic with the text the tiny-trained
fixture was trained or calibrated on (scoutq.data.corpus), so its perplexity is held out.
Windows are cut exactly as the fixture's own evaluation cuts them (fixtures/trained.py): one
stream of all documents, each opened by BOS, split into non-overlapping windows with the
trailing partial window dropped. Equal-length windows need no padding, and "first N windows"
is the same text for every model compared.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scoutq.data.corpus import builtin_corpus
from scoutq.data.tokens import model_tokenizer, token_stream
from scoutq.errors import ScoutqError


def evaluation_windows(
    tokenizer_dir: Path, seq_len: int, samples: int | None, texts: list[str] | None = None
) -> torch.Tensor:
    """Non-overlapping token windows of the evaluation text.

    Args:
        tokenizer_dir: directory holding tokenizer.json (the checkpoint directory), or a GGUF
            file (its embedded vocabulary).
        seq_len: tokens per window; tokens 1..seq_len-1 of each are scored, so at least 2.
        samples: how many windows to keep, from the start of the stream; None keeps all. Fewer
            are returned when the text has fewer.
        texts: documents to use instead of the builtin corpus's evaluation split.

    Returns:
        [W, seq_len] int64 token ids.
    """
    if seq_len < 2:
        raise ScoutqError(f"sequence length must be at least 2 (one token of context, one scored), got {seq_len}")
    if samples is not None and samples < 1:
        raise ScoutqError(f"samples must be at least 1, got {samples}")
    if texts is None:
        documents, source = builtin_corpus().evaluation, "the builtin corpus's evaluation split"
    else:
        documents, source = texts, "the given evaluation text"
    tokenizer = model_tokenizer(tokenizer_dir, "evaluation")
    stream = token_stream(tokenizer, documents)
    count = stream.numel() // seq_len
    if count == 0:
        raise ScoutqError(
            f"{source} has {stream.numel()} tokens, fewer than one window of {seq_len} (give more text or a "
            "shorter sequence length)"
        )
    if samples is not None:
        count = min(count, samples)
    return stream[: count * seq_len].view(count, seq_len).clone()  # clone: do not keep the whole stream alive
