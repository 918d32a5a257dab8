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


def model_tokenizer(path: Path, needed_by: str = "evaluation") -> Tokenizer:
    """The tokenizer of a checkpoint directory (its tokenizer.json) or a GGUF file (its
    embedded vocabulary)."""
    from scoutq.checkpoint.gguf_file import GgufFile, is_gguf

    return GgufFile.open(path).tokenizer() if is_gguf(Path(path)) else load_tokenizer(path, needed_by)


def special_token_ids(path: Path) -> tuple[int | None, set[int]]:
    """(BOS id, end-of-sequence ids) of a checkpoint directory or GGUF file.

    End ids gather config.json's (top level and text_config) and generation_config.json's
    `eos_token_id`, each an int or a list: instruct Llama 4 checkpoints end a turn with
    <|eot|> as well as <|end_of_text|>, and list both only in generation_config.json.
    """
    import json

    from scoutq.checkpoint.config import read_config_json
    from scoutq.checkpoint.gguf_file import GgufFile, is_gguf

    path = Path(path)
    configs = [GgufFile.open(path).config_json()] if is_gguf(path) else [read_config_json(path)]
    if not is_gguf(path):
        configs.append(configs[0].get("text_config") or {})
        generation = path / "generation_config.json"
        if generation.is_file():
            configs.append(json.loads(generation.read_text()))
    bos = next((c["bos_token_id"] for c in configs if isinstance(c.get("bos_token_id"), int)), None)
    ends: set[int] = set()
    for config in configs:
        value = config.get("eos_token_id")
        ends.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return bos, ends
