"""Calibration sets: shipped YAML, strict fields, local / builtin / hub text, and seeded token windows.

A calibration batch must be reproducible (same set, tokenizer and seed -> same tokens and the
same fingerprint) and every window must be real text from the set: a contiguous slice of the
tokenised stream. Every way the text can be missing (no file, bad JSON line, no hub) is a
one-line ScoutqError that names the file or the set.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from scoutq.data.corpus import builtin_corpus
from scoutq.data.sets import (
    CalibrationSet,
    calibration_batch,
    load_calibration_set,
    read_documents,
    shipped_calibration_sets,
)
from scoutq.data.tokens import token_stream
from scoutq.errors import ScoutqError
from scoutq.fixtures.tokenizer import BOS, save_tokenizer, train_tokenizer

SHIPPED = shipped_calibration_sets()
VOCAB = 400
PARAGRAPHS = [
    "Quantization maps each weight to one of a few levels.",
    "A calibration set is text run through the model\nso that activations can be observed.",
    "Experts in a mixture see only the tokens routed to them.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE (BOS-prepending, like the fixtures'), trained in well under a second."""
    texts = builtin_corpus().train[:20] + PARAGRAPHS
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(texts, VOCAB), directory, max_length=4096)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def write_set(directory: Path, body: str, name: str = "set.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def assert_windows_of(tokens: torch.Tensor, stream: torch.Tensor) -> None:
    """Every row of `tokens` is a contiguous slice of `stream`."""
    windows = {tuple(w.tolist()) for w in stream.unfold(0, tokens.shape[1], 1)}
    for row in tokens:
        assert tuple(row.tolist()) in windows


# -- shipped sets ------------------------------------------------------------------------------


def test_the_expected_sets_ship() -> None:
    assert {p.stem for p in SHIPPED} == {"wikitext2", "c4", "pile-val", "builtin", "builtin-train"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_set_loads_by_path_and_by_name(path: Path) -> None:
    cset = load_calibration_set(path)
    assert cset.name == path.stem
    assert cset.description
    assert load_calibration_set(path.stem) == cset
    assert cset.seed == 0
    if cset.source == "hub":
        assert (cset.samples, cset.seq_len) == (128, 2048)
        assert cset.dataset and cset.split and cset.text_field == "text"
    elif cset.part == "train":
        assert cset.source == "builtin"
        assert (cset.samples, cset.seq_len) == (512, 256)
    else:
        assert cset.source == "builtin"
        assert (cset.samples, cset.seq_len) == (128, 256)


def test_shipped_hub_sets_name_the_expected_datasets() -> None:
    sets = {p.stem: load_calibration_set(p) for p in SHIPPED}
    assert (sets["wikitext2"].dataset, sets["wikitext2"].config, sets["wikitext2"].split) == (
        "wikitext",
        "wikitext-2-raw-v1",
        "train",
    )
    assert (sets["c4"].dataset, sets["c4"].split) == ("allenai/c4", "validation")
    assert sets["c4"].data_files == "en/c4-validation.00000-of-00008.json.gz"
    assert (sets["pile-val"].dataset, sets["pile-val"].split) == ("mit-han-lab/pile-val-backup", "validation")


def test_fingerprint_follows_meaning_not_formatting(tmp_path: Path) -> None:
    plain = write_set(tmp_path, "name: b\nsource: builtin\nsamples: 4\nseq_len: 8\n", "a.yaml")
    spaced = write_set(tmp_path, "# comment\nseq_len:   8\nsamples: 4\nsource: builtin\nname: b\n", "b.yaml")
    reseeded = write_set(tmp_path, "name: b\nsource: builtin\nsamples: 4\nseq_len: 8\nseed: 1\n", "c.yaml")
    first = load_calibration_set(plain).fingerprint()
    assert len(first) == 64
    assert load_calibration_set(spaced).fingerprint() == first
    assert load_calibration_set(reseeded).fingerprint() != first


def test_unknown_name_lists_the_shipped_sets() -> None:
    with pytest.raises(ScoutqError) as err:
        load_calibration_set("wikitext3")
    message = str(err.value)
    assert message.startswith("wikitext3: no such calibration set")
    for path in SHIPPED:
        assert path.stem in message


# -- field validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("source: hub\nsplit: train\n", "a hub set needs dataset"),
        ("source: hub\ndataset: wikitext\n", "a hub set needs split"),
        ("source: hub\ndataset: wikitext\nsplit: train\npath: a.txt\n", "a hub set does not use path"),
        ("source: local\npath: a.txt\ndataset: wikitext\n", "a local set does not use dataset"),
        ("source: local\n", "a local set needs path"),
        ("source: local\npath: a.csv\n", "must be a .txt, .jsonl, .parquet file"),
        ("source: builtin\ntext_field: body\n", "a builtin set does not use text_field"),
        ("source: builtin\npart: evaluation\n", "part: Input should be 'calibration' or 'train'"),
        ("source: local\npath: a.txt\npart: train\n", "a local set does not use part"),
        ("source: hub\ndataset: d\nsplit: s\npart: train\n", "a hub set does not use part"),
        ("source: hub\ndataset: d\nsplit: s\nconfig: c\ndata_files: f.json\n", "config and data_files"),
        ("source: builtin\nsamples_count: 4\n", "samples_count: Extra inputs are not permitted"),
        ("source: web\n", "source: Input should be 'hub', 'local' or 'builtin'"),
    ],
)
def test_fields_must_match_the_source(tmp_path: Path, body: str, expected: str) -> None:
    path = write_set(tmp_path, f"name: bad\n{body}samples: 4\nseq_len: 8\n")
    with pytest.raises(ScoutqError) as err:
        load_calibration_set(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("samples", 0), ("seq_len", 1)])
def test_samples_and_seq_len_are_bounded(tmp_path: Path, field: str, value: int) -> None:
    body = {"name": "b", "source": "builtin", "samples": 4, "seq_len": 8, field: value}
    path = write_set(tmp_path, json.dumps(body))  # JSON is YAML
    with pytest.raises(ScoutqError, match=f"{field}: Input should be greater than"):
        load_calibration_set(path)


# -- builtin batches ---------------------------------------------------------------------------


def test_builtin_batch_shape_range_and_provenance(tokenizer_dir: Path, tokenizer: Tokenizer) -> None:
    cset = load_calibration_set("builtin")
    batch = calibration_batch(cset, tokenizer_dir, samples=6, seq_len=48)
    assert batch.tokens.shape == (6, 48)
    assert batch.tokens.dtype == torch.int64
    assert int(batch.tokens.min()) >= 0 and int(batch.tokens.max()) < tokenizer.get_vocab_size()
    assert (batch.set_name, batch.samples, batch.seq_len, batch.seed) == ("builtin", 6, 48, 0)
    stream = token_stream(tokenizer, builtin_corpus().calibration)
    assert batch.source_tokens == stream.numel() > 1000
    assert int((stream == tokenizer.token_to_id(BOS)).sum()) == len(builtin_corpus().calibration)
    assert_windows_of(batch.tokens, stream)


def test_builtin_train_reads_the_training_part_and_keeps_old_fingerprints(
        tokenizer_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    cset = load_calibration_set("builtin-train")
    batch = calibration_batch(cset, tokenizer_dir, samples=6, seq_len=48)
    stream = token_stream(tokenizer, builtin_corpus().train)
    assert batch.source_tokens == stream.numel() > 4 * token_stream(tokenizer, builtin_corpus().calibration).numel()
    assert_windows_of(batch.tokens, stream)
    # `part: calibration` is the default spelled out; a set without `part` hashes as it did
    # before the field existed (the sha256 of its canonical JSON without the key).
    implicit = write_set(tmp_path, "name: b\nsource: builtin\nsamples: 4\nseq_len: 8\n", "a.yaml")
    explicit = write_set(tmp_path, "name: b\nsource: builtin\npart: calibration\nsamples: 4\nseq_len: 8\n", "b.yaml")
    a, b = load_calibration_set(implicit), load_calibration_set(explicit)
    assert read_documents(a) == read_documents(b) == builtin_corpus().calibration
    assert '"part"' not in a.canonical_json()


def test_builtin_batch_uses_the_set_defaults(tokenizer_dir: Path) -> None:
    batch = calibration_batch(load_calibration_set("builtin"), tokenizer_dir)
    assert batch.tokens.shape == (128, 256)
    assert (batch.samples, batch.seq_len, batch.seed) == (128, 256, 0)


def test_same_seed_same_tokens_other_seed_other_tokens(tokenizer_dir: Path) -> None:
    cset = load_calibration_set("builtin")
    first = calibration_batch(cset, tokenizer_dir, samples=8, seq_len=32, seed=3)
    again = calibration_batch(cset, tokenizer_dir, samples=8, seq_len=32, seed=3)
    other = calibration_batch(cset, tokenizer_dir, samples=8, seq_len=32, seed=4)
    assert torch.equal(first.tokens, again.tokens)
    assert first.fingerprint == again.fingerprint
    assert not torch.equal(first.tokens, other.tokens)
    assert first.fingerprint != other.fingerprint
    # The set's own seed is the default, and an argument overrides it.
    seeded = cset.model_copy(update={"seed": 3})
    assert torch.equal(calibration_batch(seeded, tokenizer_dir, samples=8, seq_len=32).tokens, first.tokens)


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ScoutqError) as err:
        calibration_batch(load_calibration_set("builtin"), tmp_path)
    assert str(err.value) == f"{tmp_path}: no tokenizer.json; calibration needs the checkpoint's own tokenizer"


# -- local files -------------------------------------------------------------------------------


def test_local_txt_splits_on_blank_lines_and_resolves_relative_paths(
    tmp_path: Path, tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("\n\n".join(PARAGRAPHS[:2]) + "\n  \n" + PARAGRAPHS[2] + "\n")
    path = write_set(tmp_path / "data", "name: notes\nsource: local\npath: notes.txt\nsamples: 5\nseq_len: 8\n")
    cset = load_calibration_set(path)
    assert Path(cset.path or "") == (data / "notes.txt").resolve()
    assert read_documents(cset) == PARAGRAPHS
    batch = calibration_batch(cset, tokenizer_dir, seed=1)
    assert batch.tokens.shape == (5, 8)
    assert_windows_of(batch.tokens, token_stream(tokenizer, PARAGRAPHS))


def test_a_bare_text_file_is_a_set(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("one\n\ntwo\n")
    cset = load_calibration_set(str(path))
    assert (cset.name, cset.source, cset.samples, cset.seq_len, cset.seed) == ("mine", "local", 128, 512, 0)
    assert read_documents(cset) == ["one", "two"]


def test_local_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    lines = [json.dumps({"body": text, "id": i}) for i, text in enumerate(PARAGRAPHS)]
    lines.insert(1, json.dumps({"body": "", "id": 9}))  # empty documents are dropped
    lines.insert(2, "")  # so are blank lines
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    path = write_set(tmp_path, "name: j\nsource: local\npath: docs.jsonl\ntext_field: body\nsamples: 2\nseq_len: 4\n")
    assert read_documents(load_calibration_set(path)) == PARAGRAPHS


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [('{"text": "unterminated', "not valid JSON"), ('{"body": "x"}', "expected a JSON object with a string field")],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text(f'{{"text": "fine"}}\n{{"text": "also fine"}}\n{bad_line}\n')
    with pytest.raises(ScoutqError) as err:
        read_documents(load_calibration_set(file))
    assert str(err.value).startswith(f"{file.resolve()}:3: {expected}")


def test_local_parquet_reads_the_text_column(tmp_path: Path, tokenizer_dir: Path) -> None:
    file = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [*PARAGRAPHS, None, ""], "n": [1, 2, 3, 4, 5]}), file)
    cset = load_calibration_set(file)
    assert read_documents(cset) == PARAGRAPHS
    assert calibration_batch(cset, tokenizer_dir, samples=3, seq_len=6).tokens.shape == (3, 6)

    wrong = write_set(
        tmp_path, "name: p\nsource: local\npath: docs.parquet\ntext_field: body\nsamples: 1\nseq_len: 2\n"
    )
    with pytest.raises(ScoutqError, match=r"docs\.parquet: no column 'body' \(columns: text, n\)"):
        read_documents(load_calibration_set(wrong))


def test_missing_or_empty_local_file_names_the_file(tmp_path: Path) -> None:
    path = write_set(tmp_path, "name: gone\nsource: local\npath: gone.txt\nsamples: 1\nseq_len: 2\n")
    with pytest.raises(ScoutqError) as err:
        read_documents(load_calibration_set(path))
    assert str(err.value) == f"{(tmp_path / 'gone.txt').resolve()}: no such file (calibration set 'gone')"

    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ScoutqError, match=r"blank\.txt: no text in this file"):
        read_documents(load_calibration_set(blank))

    with pytest.raises(ScoutqError, match="no such calibration set"):
        load_calibration_set(tmp_path / "absent.yaml")


def test_too_short_stream_names_set_token_count_and_seq_len(
    tmp_path: Path, tokenizer_dir: Path, tokenizer: Tokenizer
) -> None:
    file = tmp_path / "short.txt"
    file.write_text(PARAGRAPHS[0])
    count = len(tokenizer.encode(PARAGRAPHS[0]).ids)
    with pytest.raises(ScoutqError) as err:
        calibration_batch(load_calibration_set(file), tokenizer_dir, seq_len=count + 1)
    assert str(err.value).startswith(f"calibration set 'short' has {count} tokens, fewer than seq_len {count + 1}")
    # Exactly seq_len tokens is enough: every window is the whole stream.
    batch = calibration_batch(load_calibration_set(file), tokenizer_dir, samples=3, seq_len=count)
    assert all(torch.equal(row, batch.tokens[0]) for row in batch.tokens)


# -- hub sets offline --------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline mode with empty caches, so no request is attempted and no cached copy is found.

    datasets and huggingface_hub read these variables once, at import, and another test may
    have imported them already: the module-level copies are patched as well.
    """
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.usefixtures("offline_hub")
def test_hub_set_offline_is_one_quick_line() -> None:
    started = time.monotonic()
    with pytest.raises(ScoutqError) as err:
        read_documents(load_calibration_set("wikitext2"))
    assert time.monotonic() - started < 20  # online retries take ~25 s; offline must not try
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "calibration set 'wikitext2' needs the Hugging Face hub (wikitext/wikitext-2-raw-v1), which is not reachable: "
    )
    assert message.endswith("offline, use --calibration builtin or a local .txt/.jsonl/.parquet file")


@pytest.mark.usefixtures("offline_hub")
def test_unknown_hub_dataset_offline_names_the_set(tokenizer_dir: Path) -> None:
    cset = CalibrationSet(
        name="mine", source="hub", dataset="scoutq-tests/no-such-set", split="train", samples=1, seq_len=2
    )
    with pytest.raises(ScoutqError, match=r"^calibration set 'mine' needs the Hugging Face hub \(scoutq-tests/no-such"):
        calibration_batch(cset, tokenizer_dir)
