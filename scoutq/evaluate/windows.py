"""Evaluation text as token windows, encoded with the checkpoint's own tokenizer.

The builtin corpus's `evaluation` split shares no topic with the text the tiny-trained
fixture was trained or calibrated on (scoutq.data.corpus), so its perplexity is held out.
Windows are cut exactly as the fixture's own evaluation cuts them (fixtures/trained.py): one
stream of all documents, each opened by BOS, split into non-overlapping windows with the
trailing partial window dropped. Equal-length windows need no padding, and "first N windows"
is the same text for every model compared.

`document_windows` is the other convention, the one lm-evaluation-harness's rolling
perplexity (wikitext) uses: each document alone, every token scored once. It is what makes
`scoutq eval --windows documents` and the harness's rolling tasks score the same predictions.
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


def document_windows(
    tokenizer_dir: Path, seq_len: int, samples: int | None, texts: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of every document scored once, in the windows lm-evaluation-harness's rolling
    log-likelihood uses (wikitext-style perplexity).

    Each document is scored on its own, opened by BOS. Its first window predicts the first
    seq_len - 1 tokens after BOS; each later window predicts the next seq_len - 1 tokens, seeing
    the one token before them; the last window predicts what is left, seeing as many earlier
    tokens as fill seq_len. This is the harness's `get_rolling_token_windows(context_len=1)`
    with `make_disjoint_window`, for a model input of max_length = seq_len - 1 tokens.

    Args: as `evaluation_windows` (samples keeps the first N windows).

    Returns:
        windows [W, seq_len] int64, right-padded with 0 where a document is shorter, and scored
        [W, seq_len - 1] bool: True where the target token at that position is scored.
    """
    if seq_len < 2:
        raise ScoutqError(f"sequence length must be at least 2 (one token of context, one scored), got {seq_len}")
    documents = builtin_corpus().evaluation if texts is None else texts
    tokenizer = model_tokenizer(tokenizer_dir, "evaluation")
    predicted_per_window = seq_len - 1
    rows: list[torch.Tensor] = []
    scored_rows: list[torch.Tensor] = []
    for encoding in tokenizer.encode_batch(documents):
        tokens = torch.tensor(encoding.ids, dtype=torch.int64)  # BOS, then the document
        body = tokens.numel() - 1
        done = 0
        while done < body:
            count = min(predicted_per_window, body - done)
            end = done + count + 1  # one past the last predicted token, in `tokens`
            start = max(0, end - seq_len)
            window = torch.zeros(seq_len, dtype=torch.int64)
            window[: end - start] = tokens[start:end]
            scored = torch.zeros(seq_len - 1, dtype=torch.bool)
            scored[end - start - 1 - count : end - start - 1] = True
            rows.append(window)
            scored_rows.append(scored)
            done += count
    if not rows:
        raise ScoutqError("the evaluation text has no tokens to score")
    if samples is not None:
        rows, scored_rows = rows[:samples], scored_rows[:samples]
    return torch.stack(rows), torch.stack(scored_rows)


WINDOWINGS = ("stream", "documents")


def token_windows(windowing: str, tokenizer_dir: Path, seq_len: int, samples: int | None,
                  texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The windows `scoutq eval --windows` names, and the scored mask (None: every target scored)."""
    if windowing == "documents":
        return document_windows(tokenizer_dir, seq_len, samples, texts)
    return evaluation_windows(tokenizer_dir, seq_len, samples, texts), None
