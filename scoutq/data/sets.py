"""Calibration sets: YAML definitions of where calibration text comes from, and its tokens.

    name: wikitext2
    description: WikiText-2 train split, the usual GPTQ calibration text
    source: hub                 # hub | local | builtin
    dataset: wikitext           # hub: a datasets hub id
    config: wikitext-2-raw-v1   # hub: optional dataset config
    split: train                # hub
    text_field: text            # hub and local .jsonl / .parquet: the column holding the text
    samples: 128                # defaults, overridable per run
    seq_len: 2048
    seed: 0

A local set has `path` (a .txt, .jsonl or .parquet file, relative to the YAML file) instead of
`dataset`/`config`/`split`; a builtin set has neither and uses the calibration part of the
offline corpus, or with `part: train` its training part (the text the fixtures learned from). Like recipes, unknown keys are errors, and so are keys that belong to another
source: a hub set that also names a `path` is ambiguous, and guessing would calibrate on
different text than the user meant.

The batch records a fingerprint over the set and its token bytes, so a manifest can say
exactly which tokens a quantized checkpoint was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scoutq.data.corpus import builtin_corpus
from scoutq.data.shipped import shipped_dir, shipped_yaml
from scoutq.data.tokens import load_tokenizer, token_stream
from scoutq.errors import ScoutqError, one_line

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# A bare text file given instead of a YAML set gets these defaults: enough tokens for a
# calibration pass over a small user file, without demanding GPTQ's 128 x 2048 tokens.
FILE_SAMPLES, FILE_SEQ_LEN = 128, 512
OFFLINE_CHOICES = "offline, use --calibration builtin or a local .txt/.jsonl/.parquet file"

# Which optional keys each source needs (required) and which it must not have (forbidden).
_HUB_KEYS = ("dataset", "config", "split", "data_files")
_REQUIRED: dict[str, tuple[str, ...]] = {"hub": ("dataset", "split"), "local": ("path",), "builtin": ()}
_FORBIDDEN: dict[str, tuple[str, ...]] = {
    "hub": ("path", "part"),
    "local": (*_HUB_KEYS, "part"),
    "builtin": (*_HUB_KEYS, "path", "text_field"),
}


class CalibrationSet(BaseModel):
    """One calibration set: the text source plus default samples, sequence length and seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    source: Literal["hub", "local", "builtin"]
    # hub
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    # Hub files to read instead of a config, for datasets too big to load whole (allenai/c4's
    # `en` config is ~300 GB; GPTQ reads one validation shard). Read as the split `split`.
    data_files: str | list[str] | None = None
    # local
    path: str | None = None
    # builtin: which part of the offline corpus (default: calibration)
    part: Literal["calibration", "train"] | None = None
    # hub, local .jsonl and .parquet
    text_field: str = "text"
    samples: Annotated[int, Field(gt=0)]
    seq_len: Annotated[int, Field(gt=1)]
    seed: int = 0

    @model_validator(mode="after")
    def _fields_match_source(self) -> CalibrationSet:
        given = self.model_fields_set
        missing = [key for key in _REQUIRED[self.source] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"a {self.source} set needs {', '.join(missing)}")
        extra = [key for key in _FORBIDDEN[self.source] if key in given]
        if extra:
            raise ValueError(
                f"a {self.source} set does not use {', '.join(extra)}; remove {'it' if len(extra) == 1 else 'them'}"
            )
        if self.config is not None and self.data_files is not None:
            raise ValueError("config and data_files are alternatives; give one")
        if self.path is not None and not self.path.endswith(LOCAL_SUFFIXES):
            raise ValueError(f"path {self.path!r} must be a {', '.join(LOCAL_SUFFIXES)} file")
        return self

    def canonical_json(self) -> str:
        meaning = self.model_dump(mode="json")
        if meaning["part"] is None:
            del meaning["part"]  # sets written before `part` existed keep their fingerprints
        return json.dumps(meaning, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the set's meaning (not its file's formatting or comments)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def hub_id(self) -> str:
        """`dataset/config`, or `dataset [files]`, for messages."""
        if self.data_files is not None:
            files = self.data_files if isinstance(self.data_files, str) else ", ".join(self.data_files)
            return f"{self.dataset} [{files}]"
        return f"{self.dataset}/{self.config}" if self.config else str(self.dataset)


@dataclass(frozen=True)
class CalibrationBatch:
    """The tokens a calibrated quantizer sees, and what produced them."""

    tokens: torch.Tensor  # int64 [samples, seq_len]
    set_name: str
    fingerprint: str  # sha256 over the set's fingerprint, the shape and the token bytes
    samples: int
    seq_len: int
    seed: int
    source_tokens: int  # length of the tokenised stream the windows were drawn from


# -- loading definitions -----------------------------------------------------------------------


def shipped_calibration_sets() -> list[Path]:
    return shipped_yaml("calibration")


def load_calibration_set(name_or_path: str | Path) -> CalibrationSet:
    """A set from a YAML file, a shipped set's name, or a local text file used directly."""
    file = Path(name_or_path)
    if file.is_file():
        if file.suffix in LOCAL_SUFFIXES:
            return CalibrationSet(
                name=file.stem, source="local", path=str(file.resolve()), samples=FILE_SAMPLES, seq_len=FILE_SEQ_LEN
            )
        return _load_yaml(file)
    if file.parent == Path(".") and not file.suffix:
        shipped = shipped_dir("calibration") / f"{file.name}.yaml"
        if shipped.is_file():
            return _load_yaml(shipped)
    names = ", ".join(p.stem for p in shipped_calibration_sets())
    raise ScoutqError(
        f"{name_or_path}: no such calibration set (shipped sets: {names}; "
        f"or give a .yaml set or a {'/'.join(LOCAL_SUFFIXES)} file)"
    )


def _load_yaml(file: Path) -> CalibrationSet:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ScoutqError(f"{file}: cannot read calibration set ({one_line(err)})") from None
    if not isinstance(raw, dict):
        raise ScoutqError(f"{file}: a calibration set is a YAML mapping with name, source, samples, seq_len")
    if isinstance(raw.get("path"), str):
        # Relative to the YAML file, so a set and its text can move together.
        raw["path"] = str((file.parent / raw["path"]).resolve())
    try:
        return CalibrationSet.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "calibration set"
        message = first["msg"].removeprefix("Value error, ")
        raise ScoutqError(f"{file}: {where}: {message}") from None


# -- reading text ------------------------------------------------------------------------------


def read_documents(cset: CalibrationSet) -> list[str]:
    """The set's text as a list of non-empty documents."""
    if cset.source == "builtin":
        return builtin_corpus().split(cset.part or "calibration")
    if cset.source == "hub":
        return _hub_documents(cset)
    assert cset.path is not None  # guaranteed by the model validator
    path = Path(cset.path)
    if not path.is_file():
        raise ScoutqError(f"{path}: no such file (calibration set {cset.name!r})")
    if path.suffix == ".txt":
        documents = _txt_documents(path)
    elif path.suffix == ".jsonl":
        documents = _jsonl_documents(path, cset.text_field)
    else:
        documents = _parquet_documents(path, cset.text_field)
    if not documents:
        raise ScoutqError(f"{path}: no text in this file (calibration set {cset.name!r})")
    return documents


def _hub_documents(cset: CalibrationSet) -> list[str]:
    import datasets  # slow to import, and only hub sets need it

    assert cset.dataset is not None and cset.split is not None
    data_files = {cset.split: cset.data_files} if cset.data_files is not None else None
    try:
        dataset = datasets.load_dataset(cset.dataset, cset.config, split=cset.split, data_files=data_files)
    except Exception as err:  # noqa: BLE001 - datasets raises many types when offline; all mean "cannot load"
        if _is_unreachable(err):
            raise ScoutqError(
                f"calibration set {cset.name!r} needs the Hugging Face hub ({cset.hub_id()}), which is not "
                f"reachable: {one_line(err)}; {OFFLINE_CHOICES}"
            ) from None
        raise ScoutqError(
            f"calibration set {cset.name!r}: cannot load {cset.hub_id()} split {cset.split!r} from the hub "
            f"({one_line(err)}); {OFFLINE_CHOICES}"
        ) from None
    if cset.text_field not in dataset.column_names:
        raise ScoutqError(
            f"calibration set {cset.name!r}: {cset.hub_id()} has no column {cset.text_field!r} "
            f"(columns: {', '.join(dataset.column_names)}); set text_field"
        )
    documents = [text for text in dataset[cset.text_field] if isinstance(text, str) and text.strip()]
    if not documents:
        raise ScoutqError(f"calibration set {cset.name!r}: {cset.hub_id()} has no text in {cset.text_field!r}")
    return documents


def _is_unreachable(err: Exception) -> bool:
    """Whether `err` means the hub could not be reached (offline mode, DNS, timeout, not cached)."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return True
    # datasets wraps network failures in ConnectionError; httpx's own errors are not OSErrors.
    # A dataset id or file the hub does not have is a DatasetsError: the hub answered.
    if isinstance(err, datasets.exceptions.DatasetsError):
        return False
    return isinstance(err, (OSError, TimeoutError)) or type(err).__module__.startswith(("httpx", "requests"))


def _txt_documents(path: Path) -> list[str]:
    """One document per blank-line separated block: paragraphs are the natural unit of a text file."""
    text = _read_text(path)
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def _jsonl_documents(path: Path, field: str) -> list[str]:
    documents: list[str] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScoutqError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ScoutqError(f"{path}:{number}: expected a JSON object with a string field {field!r}")
        if record[field].strip():
            documents.append(record[field])
    return documents


def _parquet_documents(path: Path, field: str) -> list[str]:
    import pyarrow as pa  # installed with datasets
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if field not in schema.names:
            raise ScoutqError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); set text_field")
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            raise ScoutqError(f"{path}: column {field!r} holds {schema.field(field).type}, not text")
        column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise ScoutqError(f"{path}: cannot read as parquet ({one_line(err)})") from None
    return [text for text in column if isinstance(text, str) and text.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ScoutqError(f"{path}: cannot read as UTF-8 text ({one_line(err)})") from None


# -- tokens ------------------------------------------------------------------------------------


def calibration_batch(
    cset: CalibrationSet,
    tokenizer_dir: Path,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
) -> CalibrationBatch:
    """`samples` windows of `seq_len` tokens drawn from the set's text; arguments override its defaults.

    The documents are encoded with the checkpoint's own tokenizer (BOS included, as the
    post-processor adds it) and concatenated into one stream, as for training the fixtures:
    no padding, and a document boundary is marked by its BOS. Window starts are drawn
    uniformly from a generator seeded with `seed`, so the same set, tokenizer and seed give
    the same tokens on any machine.
    """
    samples = cset.samples if samples is None else samples
    seq_len = cset.seq_len if seq_len is None else seq_len
    seed = cset.seed if seed is None else seed
    if samples < 1 or seq_len < 2:
        raise ScoutqError(f"calibration needs samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")

    tokenizer = load_tokenizer(Path(tokenizer_dir))
    stream = token_stream(tokenizer, read_documents(cset))
    if stream.numel() < seq_len:
        raise ScoutqError(
            f"calibration set {cset.name!r} has {stream.numel()} tokens, fewer than seq_len {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    # Starts are drawn independently, so windows may overlap (or repeat) when the stream is
    # short compared with samples x seq_len; that reuses text but keeps every window full-length.
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=generator)
    tokens = stream[starts[:, None] + torch.arange(seq_len)]

    digest = hashlib.sha256(f"{cset.fingerprint()}:{samples}x{seq_len}:".encode())
    digest.update(tokens.numpy().astype("<i8").tobytes())
    return CalibrationBatch(tokens, cset.name, digest.hexdigest(), samples, seq_len, seed, stream.numel())
