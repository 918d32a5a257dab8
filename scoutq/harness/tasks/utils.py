"""Loaders of scoutq's offline lm-eval tasks (named by the YAML files' `custom_dataset`).

The harness imports this file by path, so it reads its data relative to itself: the tasks
work from the source tree and from an installed wheel alike, with no network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> datasets.DatasetDict:
    with open(DATA / name, encoding="utf-8") as rows:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in rows])})


def cloze(**_: Any) -> datasets.DatasetDict:
    return _load("pydoc_cloze.jsonl")


def next_word(**_: Any) -> datasets.DatasetDict:
    return _load("pydoc_next_word.jsonl")


def rolling(**_: Any) -> datasets.DatasetDict:
    return _load("pydoc_rolling.jsonl")
