"""Quantization recipes: YAML files validated into ordered rules.

    name: w4a16-g128-gptq
    method: gptq                # rtn (data-free), gptq or clip (calibrated)
    rules:                      # first matching rule wins
      - targets: [routed_experts, shared_expert]
        weights: {bits: 4, group_size: 128, symmetric: true}
    ignore: ["re:.*layers\\.0\\..*"]   # modules kept in source precision
    calibration: {dataset: builtin, samples: 128, seq_len: 256, min_tokens: 32, fallback: all_experts}
    gptq: {damp: 0.01, act_order: true}

A target is a role group (below), an exact module name, or `re:` + a regular expression
matched against module names (the checkpoint key without `.weight`; routed experts are named
per expert, `...feed_forward.experts.7.gate_proj`). Unknown keys are errors: a typo must not
silently produce a different checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scoutq.checkpoint.layout import NORM_ROLES, Role
from scoutq.data.shipped import shipped_dir, shipped_yaml
from scoutq.errors import ScoutqError
from scoutq.quant.ct_schema import pattern_error
from scoutq.quant.ggml import GGML_SCHEMES
from scoutq.quant.scheme import Scheme
from scoutq.quant.settings import ClipSettings, GptqSettings

# Roles that always stay in source precision: build_plan refuses a recipe that would quantize one.
NEVER_QUANTIZED: frozenset[Role] = frozenset({Role.ROUTER, Role.EMBED}) | NORM_ROLES

# The role groups a recipe target may name (spelled as users write them in YAML) and the
# checkpoint roles each covers. router, norms and embeddings are never quantizable; they are
# named so that a recipe asking for them gets a clear refusal instead of "unknown target".
ROLE_GROUPS: dict[str, frozenset[Role]] = {
    "routed_experts": frozenset({Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN}),
    "shared_expert": frozenset({Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN}),
    "attention": frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O}),
    "dense_mlp": frozenset({Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN}),
    "lm_head": frozenset({Role.LM_HEAD}),
    "vision": frozenset({Role.VISION}),
    "projector": frozenset({Role.PROJECTOR}),
    "router": frozenset({Role.ROUTER}),
    "norms": NORM_ROLES,
    "embeddings": frozenset({Role.EMBED}),
}
FORBIDDEN_GROUPS = frozenset(name for name, roles in ROLE_GROUPS.items() if roles <= NEVER_QUANTIZED)


class Method(StrEnum):
    RTN = "rtn"  # round-to-nearest, data-free
    GPTQ = "gptq"  # Hessian-based error compensation (gptq.py)
    CLIP = "clip"  # activation-weighted scale search (clip.py)


class Fallback(StrEnum):
    """What an expert routed fewer than `min_tokens` calibration tokens gets."""

    RTN = "rtn"  # round-to-nearest, no statistics
    ALL_EXPERTS = "all_experts"  # statistics from every token's score-scaled input


class Calibration(BaseModel):
    """Where the calibration data comes from and how experts are covered.

    dataset: a calibration set (calibration/*.yaml name or path, or a .txt/.jsonl/.parquet
    file). samples, seq_len and seed default to the set's own. all_experts: every expert's
    statistics see every token (scaled by its own router score), while only routed outputs
    propagate. min_tokens: experts routed fewer tokens than this get `fallback` instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "builtin"
    samples: Annotated[int, Field(gt=0)] | None = None
    seq_len: Annotated[int, Field(gt=1)] | None = None
    seed: int | None = None
    all_experts: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 32
    fallback: Fallback = Fallback.ALL_EXPERTS


CALIBRATED_GGML = ("q4_0", "q8_0")  # ggml types whose grid GPTQ and clip search (symmetric, fp16 scales)


class OutputFormat(StrEnum):
    COMPRESSED_TENSORS = "compressed-tensors"  # a safetensors directory (vLLM, transformers)
    GGUF = "gguf"  # one GGUF file (llama.cpp)


class WeightScheme(BaseModel):
    """Either bits (with group_size and symmetric) for compressed-tensors, or a ggml_type for GGUF."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8] | None = None
    group_size: Annotated[int, Field(gt=0, multiple_of=8)] | None = None
    symmetric: bool = True
    ggml_type: Literal["q4_0", "q8_0", "q4_k"] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> WeightScheme:
        if (self.bits is None) == (self.ggml_type is None):
            raise ValueError("give bits (compressed-tensors) or ggml_type (gguf), not both or neither")
        if self.ggml_type is not None and (self.group_size is not None or not self.symmetric):
            raise ValueError(f"ggml_type {self.ggml_type} fixes its own groups and symmetry; remove group_size/symmetric")
        return self

    def scheme(self) -> Scheme:
        if self.ggml_type is not None:
            return GGML_SCHEMES[self.ggml_type]
        assert self.bits is not None
        return Scheme(self.bits, self.group_size, self.symmetric)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(min_length=1)
    weights: WeightScheme

    @field_validator("targets")
    @classmethod
    def _targets_are_known(cls, targets: list[str]) -> list[str]:
        for target in targets:
            if (bad := pattern_error(target)) is not None:
                raise ValueError(f"target {target!r} is not a valid regular expression ({bad})")
            if not target.startswith("re:") and "." not in target and target not in ROLE_GROUPS:
                groups = ", ".join(g for g in ROLE_GROUPS if g not in FORBIDDEN_GROUPS)
                raise ValueError(f"unknown target {target!r}; use a role group ({groups}), a module name or 're:<regex>'")
        return targets


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    format: OutputFormat = OutputFormat.COMPRESSED_TENSORS
    method: Method = Method.RTN
    rules: list[Rule] = Field(default_factory=list)  # a gguf recipe may have none: a plain conversion
    ignore: list[str] = Field(default_factory=list)
    calibration: Calibration | None = None
    gptq: GptqSettings | None = None
    clip: ClipSettings | None = None

    @model_validator(mode="after")
    def _method_settings_agree(self) -> Recipe:
        if self.method == Method.RTN and self.calibration is not None:
            raise ValueError("method rtn uses no calibration data; remove the calibration section or choose gptq or clip")
        if self.method != Method.RTN and self.calibration is None:
            # The default calibration block (builtin set) makes a bare `method: gptq` work offline.
            object.__setattr__(self, "calibration", Calibration())
        for method, settings in ((Method.GPTQ, self.gptq), (Method.CLIP, self.clip)):
            if settings is not None and self.method != method:
                raise ValueError(f"a {method.value} section needs method: {method.value} (method is {self.method.value})")
        gguf = self.format == OutputFormat.GGUF
        if not self.rules and not gguf:
            raise ValueError("rules: a compressed-tensors recipe needs at least one rule")
        for rule in self.rules:
            if gguf and rule.weights.ggml_type is None:
                raise ValueError("a gguf recipe names each rule's ggml_type (q4_0, q8_0 or q4_k), not bits")
            if not gguf and rule.weights.ggml_type is not None:
                raise ValueError(f"ggml_type {rule.weights.ggml_type} needs format: gguf")
            if gguf and self.calibrated and rule.weights.ggml_type not in CALIBRATED_GGML:
                raise ValueError(f"ggml_type {rule.weights.ggml_type} is written by round-to-nearest only "
                                 f"(calibrated gguf recipes use {', '.join(CALIBRATED_GGML)})")
        return self

    @property
    def calibrated(self) -> bool:
        return self.method != Method.RTN

    def canonical_json(self) -> str:
        meaning = self.model_dump(mode="json")
        # Fields added with GGUF output are left out at their defaults, so a compressed-tensors
        # recipe keeps the identity (and its finished outputs keep resuming) it had before them.
        if self.format == OutputFormat.COMPRESSED_TENSORS:
            del meaning["format"]
        for rule in meaning["rules"]:
            if rule["weights"]["ggml_type"] is None:
                del rule["weights"]["ggml_type"]
        return json.dumps(meaning, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 of the recipe's meaning (not its file's formatting or comments)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; a name without a path resolves to a shipped recipe."""
    file = resolve_recipe_path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ScoutqError(f"{file}: cannot read recipe ({err})") from None
    if not isinstance(raw, dict):
        raise ScoutqError(f"{file}: a recipe is a YAML mapping with name, method, rules")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "recipe"
        raise ScoutqError(f"{file}: {where}: {first['msg']}") from None


def shipped_recipes() -> list[Path]:
    return shipped_yaml("recipes")


def resolve_recipe_path(path: str | Path) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    if file.parent == Path(".") and not file.suffix:
        shipped = shipped_dir("recipes") / f"{file.name}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(p.stem for p in shipped_recipes())
    raise ScoutqError(f"{path}: no such recipe file (shipped recipes: {names})")
