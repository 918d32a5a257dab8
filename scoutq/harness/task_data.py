"""The data of scoutq's offline lm-eval tasks, made from the builtin corpus's held-out text.

The corpus is CPython's bundled documentation (`scoutq.data.corpus`); only its evaluation
split is used, which the tiny-trained fixture never trained or calibrated on. Three tasks:

* `scoutq_pydoc_cloze` (multiple choice, like HellaSwag's "which ending"): ~40 words of a
  passage, then four 12-word continuations: the true one and three cut from other documents.
  Chance is 25%.
* `scoutq_pydoc_next_word` (generation): ~40 words of a passage; the model generates greedily
  and its first word must be the passage's next word (exact match, punctuation ignored).
* `scoutq_pydoc_rolling` (rolling log-likelihood, like wikitext): the evaluation documents
  whole; word and byte perplexity, bits per byte.

The files are generated once and shipped (tasks/data/), so every install scores the same
questions whatever its Python's documentation holds: `python -m scoutq.harness.task_data`
rewrites them, and records the corpus fingerprint they came from.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from scoutq.data.corpus import builtin_corpus

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_DIR = TASKS_DIR / "data"
SEED = 20261203
CONTEXT_WORDS, ENDING_WORDS, CHOICES = 40, 12, 4
QUESTIONS = 200
NEXT_WORD = re.compile(r"[A-Za-z][a-z]+")  # a plain word (no identifiers, numbers or markup)


def _words(text: str) -> list[re.Match[str]]:
    return list(re.finditer(r"\S+", text))


def _after_space(text: str, word: re.Match[str]) -> bool:
    """The word follows a plain space, so " " (the harness's target delimiter) is the true join."""
    return word.start() > 0 and text[word.start() - 1] == " "


def _span(text: str, words: list[re.Match[str]], first: int, count: int) -> str:
    """The raw text of words[first : first + count], original line breaks kept."""
    return text[words[first].start() : words[first + count - 1].end()]


def cloze_questions(documents: list[str], count: int, seed: int = SEED) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    spans = [(doc, _words(text)) for doc, text in enumerate(documents)]
    spans = [(doc, words) for doc, words in spans if len(words) > CONTEXT_WORDS + ENDING_WORDS]
    if len({doc for doc, _ in spans}) < CHOICES:
        raise ValueError(f"need {CHOICES} documents of at least {CONTEXT_WORDS + ENDING_WORDS} words")
    questions: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    while len(questions) < count:
        doc, words = rng.choice(spans)
        cut = rng.randrange(CONTEXT_WORDS, len(words) - ENDING_WORDS)
        text = documents[doc]
        if (doc, cut) in seen or not _after_space(text, words[cut]):
            continue
        seen.add((doc, cut))
        endings = [_span(text, words, cut, ENDING_WORDS)]
        others = rng.sample([s for s in spans if s[0] != doc], CHOICES - 1)
        for other, other_words in others:
            start = rng.randrange(0, len(other_words) - ENDING_WORDS)
            endings.append(_span(documents[other], other_words, start, ENDING_WORDS))
        order = list(range(CHOICES))
        rng.shuffle(order)
        questions.append({"context": _span(text, words, cut - CONTEXT_WORDS, CONTEXT_WORDS),
                          "choices": [endings[i] for i in order], "label": order.index(0)})
    return questions


def next_word_questions(documents: list[str], count: int, seed: int = SEED + 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    spans = [(doc, _words(text)) for doc, text in enumerate(documents)]
    spans = [(doc, words) for doc, words in spans if len(words) > CONTEXT_WORDS + 1]
    questions: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    while len(questions) < count:
        doc, words = rng.choice(spans)
        cut = rng.randrange(CONTEXT_WORDS, len(words))
        text = documents[doc]
        answer = NEXT_WORD.fullmatch(words[cut].group().rstrip(".,;:"))
        if (doc, cut) in seen or answer is None or not _after_space(text, words[cut]):
            continue
        seen.add((doc, cut))
        questions.append({"context": _span(text, words, cut - CONTEXT_WORDS, CONTEXT_WORDS), "answer": answer.group()})
    return questions


def corpus_fingerprint(documents: list[str]) -> str:
    return hashlib.sha256(json.dumps(documents).encode("utf-8")).hexdigest()


def task_files(documents: list[str]) -> dict[str, bytes]:
    """File name -> bytes of every data file, from the evaluation documents."""

    def jsonl(rows: list[dict[str, Any]]) -> bytes:
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")

    return {
        "pydoc_cloze.jsonl": jsonl(cloze_questions(documents, QUESTIONS)),
        "pydoc_next_word.jsonl": jsonl(next_word_questions(documents, QUESTIONS)),
        "pydoc_rolling.jsonl": jsonl([{"text": text} for text in documents]),
        "SOURCE.json": (json.dumps({"corpus": "builtin evaluation split (CPython pydoc_data.topics)",
                                    "corpus_sha256": corpus_fingerprint(documents), "seed": SEED},
                                   indent=1) + "\n").encode("utf-8"),
    }


def main() -> None:
    from scoutq.checkpoint.writer import atomic_write_bytes

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, content in task_files(builtin_corpus().evaluation).items():
        atomic_write_bytes(DATA_DIR / name, content)
        print(f"{DATA_DIR / name}: {len(content)} bytes")


if __name__ == "__main__":
    main()
