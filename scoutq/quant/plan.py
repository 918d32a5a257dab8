"""Resolve a recipe against a checkpoint: every output tensor, its scheme, and the lint.

The plan is computed from headers alone, so `--dry-run` works on a directory of the real
Scout's headers. It fixes the output completely (names, dtypes, shapes, order), which is what
lets an interrupted run resume shard by shard and end byte-identical.

Routed experts are always written per expert as 2-D nn.Linear keys
(`...experts.{e}.{gate,up,down}_proj.*`): transformers and vLLM only match those for
compressed-tensors checkpoints, and silently leave fused 3-D experts uninitialised
(quantized-formats.md B8).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from scoutq.checkpoint.layout import Role
from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.safetensors_io import ITEM_SIZE
from scoutq.checkpoint.writer import TensorSpec
from scoutq.errors import ScoutqError
from scoutq.quant.packed import packed_shapes
from scoutq.quant.recipe import NEVER_QUANTIZED, ROLE_GROUPS, Recipe
from scoutq.quant.scheme import Scheme

ExpertProj = Literal["gate", "up", "down"]



@dataclass(frozen=True)
class Module:
    """One nn.Linear-shaped weight of the output (or a non-Linear tensor copied as is)."""

    name: str  # module name (key without ".weight"), or the full key of a non-Linear tensor
    source: str  # checkpoint key it is read from
    role: Role
    shape: tuple[int, ...]  # [out, in] for Linear weights
    source_dtype: str
    linear: bool  # a 2-D weight a runtime builds an nn.Linear for
    layer: int | None = None
    expert: int | None = None
    proj: ExpertProj | None = None  # which slice of the fused expert tensors


@dataclass
class PlannedModule:
    module: Module
    scheme: Scheme | None  # None: written in source precision
    outputs: list[TensorSpec]

    @property
    def bytes_out(self) -> int:
        return sum(spec.nbytes for spec in self.outputs)

    @property
    def bytes_in(self) -> int:
        return math.prod(self.module.shape) * ITEM_SIZE[self.module.source_dtype]


@dataclass
class QuantPlan:
    recipe: Recipe
    items: list[PlannedModule]
    warnings: list[str] = field(default_factory=list)

    @property
    def specs(self) -> list[TensorSpec]:
        return [spec for item in self.items for spec in item.outputs]

    def quantized(self) -> list[PlannedModule]:
        return [item for item in self.items if item.scheme is not None]



def enumerate_modules(checkpoint: Checkpoint) -> list[Module]:
    """Every output module in checkpoint order, fused experts split per expert and projection."""
    modules: list[Module] = []
    width = checkpoint.config.intermediate_size
    for key, info in checkpoint.tensors.items():
        role = checkpoint.classify(key)
        if role.role in (Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN):
            experts, rows, cols = info.shape
            for e in range(experts):
                projs: list[ExpertProj] = ["gate", "up"] if role.role == Role.EXPERTS_GATE_UP else ["down"]
                for proj in projs:
                    out_features = width if proj != "down" else cols
                    in_features = rows
                    name = checkpoint.layout.layer_key(role.layer or 0, f"feed_forward.experts.{e}.{proj}_proj")
                    modules.append(Module(name, key, role.role, (out_features, in_features), info.dtype, True,
                                          role.layer, e, proj))
            continue
        linear = key.endswith(".weight") and len(info.shape) == 2 and role.role not in (Role.EMBED, Role.UNKNOWN)
        name = key[: -len(".weight")] if linear else key
        modules.append(Module(name, key, role.role, info.shape, info.dtype, linear, role.layer))
    return modules


def _matches(target: str, module: Module) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], module.name) is not None
    if target in ROLE_GROUPS:
        return module.role in ROLE_GROUPS[target]
    return target == module.name


def build_plan(checkpoint: Checkpoint, recipe: Recipe) -> QuantPlan:
    """Assign each module its scheme (first matching rule, unless ignored) and lint the result."""
    modules = enumerate_modules(checkpoint)
    rule_hits = [0] * len(recipe.rules)
    items: list[PlannedModule] = []
    for module in modules:
        scheme = None
        # Only Linear weights take a scheme; never-quantized roles are still matched, to refuse them.
        eligible = module.linear or module.role in NEVER_QUANTIZED
        if eligible and not any(_matches(pattern, module) for pattern in recipe.ignore):
            for index, rule in enumerate(recipe.rules):
                if any(_matches(target, module) for target in rule.targets):
                    rule_hits[index] += 1
                    scheme = rule.weights.scheme()
                    break
        if scheme is not None:
            _lint_quantizable(module, scheme)
        items.append(PlannedModule(module, scheme, _outputs(module, scheme)))

    for index, hits in enumerate(rule_hits):
        if hits == 0:
            targets = ", ".join(recipe.rules[index].targets)
            raise ScoutqError(f"recipe {recipe.name!r}: rule {index + 1} ({targets}) matches nothing in this checkpoint")
    _lint_expert_schemes(items)
    return QuantPlan(recipe, items, _warnings(items))


def _lint_quantizable(module: Module, scheme: Scheme) -> None:
    if module.role in NEVER_QUANTIZED:
        what = {Role.ROUTER: "the router"}.get(module.role, "embeddings" if module.role == Role.EMBED else "a norm")
        raise ScoutqError(
            f"recipe would quantize {what} ({module.source}); routers, norms and embeddings always stay in source precision"
        )
    if not module.linear:
        raise ScoutqError(f"recipe would quantize {module.source}, which is not a 2-D Linear weight")
    in_features = module.shape[1]
    if scheme.group_size is not None and in_features % scheme.group_size:
        raise ScoutqError(
            f"{module.source}: {in_features} input features are not a multiple of group_size {scheme.group_size}"
        )


def _lint_expert_schemes(items: list[PlannedModule]) -> None:
    """One scheme for all routed experts (and projections) of a layer: fused MoE kernels take one."""
    per_layer: dict[int, set[Scheme | None]] = {}
    for item in items:
        if item.module.expert is not None:
            per_layer.setdefault(item.module.layer or 0, set()).add(item.scheme)
    for layer, schemes in per_layer.items():
        if len(schemes) > 1:
            described = sorted(s.describe() if s else "unquantized" for s in schemes)
            raise ScoutqError(
                f"recipe gives layer {layer}'s routed experts different schemes ({', '.join(described)}); "
                "a fused MoE runtime needs one scheme for all experts and projections of a layer"
            )


def _warnings(items: list[PlannedModule]) -> list[str]:
    if any(item.scheme and item.scheme.ggml is None and item.module.role in (Role.ATTN_Q, Role.ATTN_K) for item in items):
        # llama4-format.md §4: vLLM permutes q/k rows for its RoPE kernel only for tensors named
        # exactly "weight", so quantized q/k may load with the wrong rotary layout there.
        return ["attention q/k are quantized: vLLM's Llama 4 loader does not re-permute packed q/k weights (untested there)"]
    return []


def _outputs(module: Module, scheme: Scheme | None) -> list[TensorSpec]:
    if scheme is None:
        key = f"{module.name}.weight" if module.linear else module.name
        return [TensorSpec(key, module.source_dtype, module.shape)]
    out_features, in_features = module.shape
    specs = []
    for suffix, (shape, dtype) in packed_shapes(out_features, in_features, scheme).items():
        specs.append(TensorSpec(f"{module.name}.{suffix}", module.source_dtype if dtype == "SRC" else dtype, shape))
    return specs
