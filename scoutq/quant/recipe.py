"""Quantization recipes: YAML files validated into ordered rules.

    name: w4a16-g128
    method: rtn
    rules:                      # first matching rule wins
      - targets: [routed_experts, shared_expert]
        weights: {bits: 4, group_size: 128, symmetric: true}
    ignore: ["re:.*layers\\.0\\..*"]   # modules kept in source precision

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    RTN = "rtn"


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
