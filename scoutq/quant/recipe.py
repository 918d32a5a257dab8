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

from scoutq.errors import ScoutqError
from scoutq.quant.ct_schema import pattern_error
from scoutq.quant.scheme import Scheme


class RoleGroup(StrEnum):
    """Recipe-level names for sets of checkpoint roles."""

    ROUTED_EXPERTS = "routed_experts"
    SHARED_EXPERT = "shared_expert"
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    LM_HEAD = "lm_head"
    VISION = "vision"
    PROJECTOR = "projector"
    # Never quantizable; named so that a recipe asking for them gets a clear refusal.
    ROUTER = "router"
    NORMS = "norms"
    EMBEDDINGS = "embeddings"


FORBIDDEN_GROUPS = frozenset({RoleGroup.ROUTER, RoleGroup.NORMS, RoleGroup.EMBEDDINGS})


class Method(StrEnum):
    RTN = "rtn"  # round-to-nearest, data-free
    GPTQ = "gptq"  # Hessian-based error compensation (gptq.py)
    CLIP = "clip"  # activation-weighted scale search (clip.py)


class Fallback(StrEnum):
    """What an expert routed fewer than `min_tokens` calibration tokens gets."""

    RTN = "rtn"  # round-to-nearest, no statistics
    ALL_EXPERTS = "all_experts"  # statistics from every token's score-scaled input


class GptqSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    damp: Annotated[float, Field(ge=0, le=1)] = 0.01
    block_size: Annotated[int, Field(gt=0)] = 128
    act_order: bool = False
    mse_scales: bool = False
    # Symmetric scales signed so each group's largest-magnitude value lands on qmin: the grid
    # is absmax / 8, not / 7.5, at int4 (primitives.signed_scale). No effect on asymmetric.
    signed_scales: bool = False
    # Match the source model's outputs on its own inputs rather than the source weights on the
    # quantized path's inputs (GPTAQ; gptq.py). Runs a full-precision copy of the hidden states.
    fp_target: bool = False
    fp_target_damp: Annotated[float, Field(gt=0)] = 0.1
    # Router-aware rounding of the weights writing into the residual stream (o_proj, down_proj):
    # errors along later routers' directions cost 1 + router_weight times more (gptq.py). 0: off.
    router_weight: Annotated[float, Field(ge=0)] = 0.0
    row_blocks: Annotated[int, Field(gt=0)] = 8


class ClipSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: Annotated[int, Field(ge=1, le=200)] = 20  # 1: the full range only (round-to-nearest's scales)
    min_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    signed_scales: bool = False  # as GptqSettings.signed_scales


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


class WeightScheme(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8]
    group_size: Annotated[int, Field(gt=0, multiple_of=8)] | None = None
    symmetric: bool = True

    def scheme(self) -> Scheme:
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
            if not target.startswith("re:") and "." not in target and target not in RoleGroup.__members__.values():
                groups = ", ".join(g.value for g in RoleGroup if g not in FORBIDDEN_GROUPS)
                raise ValueError(f"unknown target {target!r}; use a role group ({groups}), a module name or 're:<regex>'")
        return targets


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    method: Method = Method.RTN
    rules: list[Rule] = Field(min_length=1)
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
        return self

    @property
    def calibrated(self) -> bool:
        return self.method != Method.RTN

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

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


def shipped_recipes_dir() -> Path:
    """recipes/ of the source tree, or the copy installed inside the package."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "recipes", package / "recipes"):
        if candidate.is_dir():
            return candidate
    return package.parent / "recipes"


def shipped_recipes() -> list[Path]:
    return sorted(shipped_recipes_dir().glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    if file.parent == Path(".") and not file.suffix:
        shipped = shipped_recipes_dir() / f"{file.name}.yaml"
        if shipped.is_file():
            return shipped
    names = ", ".join(p.stem for p in shipped_recipes())
    raise ScoutqError(f"{path}: no such recipe file (shipped recipes: {names})")
