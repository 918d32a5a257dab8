"""Text to token ids with a checkpoint's own tokenizer: shared by calibration, evaluation and the
fixtures' training, so all three see the same tokens for the same text."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from scoutq.errors import ScoutqError, one_line


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one 1-D int64 stream, each starting with <|begin_of_text|>.

    Concatenating (rather than padding each document) wastes no compute on padding; the BOS
    token marks where one document ends and the next begins.
    """
    ids = [token for encoding in tokenizer.encode_batch(documents) for token in encoding.ids]
    return torch.tensor(ids, dtype=torch.int64)


def load_tokenizer(directory: Path, needed_by: str = "calibration") -> Tokenizer:
    """The checkpoint's own tokenizer.json as a `tokenizers` Tokenizer (calibration and evaluation)."""
    file = Path(directory) / "tokenizer.json"
    if not file.is_file():
        raise ScoutqError(f"{directory}: no tokenizer.json; {needed_by} needs the checkpoint's own tokenizer")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a plain Exception for a bad file
        raise ScoutqError(f"{file}: cannot load tokenizer ({one_line(err)})") from None
