"""The `quantization_config` block of config.json, in compressed-tensors' schema.

Runtimes name the same module differently (quantized-formats.md B3, B8): checkpoint names
(`language_model.model.layers.0.feed_forward.router`, what vLLM and older transformers match)
versus transformers 5's module tree (`model.language_model.layers.0.feed_forward.router`).
Every name is therefore written as a `re:` pattern that accepts each known prefix, and modules
that differ only in their layer or expert number collapse into one pattern when they all get
the same treatment, so Scout's 2,304 expert projections take one line, not 2,304. Patterns
are anchored: a text-layer pattern never matches the vision tower's `layers.N`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from scoutq.checkpoint.layout import Layout
from scoutq.quant.plan import QuantPlan
from scoutq.quant.scheme import Scheme

# The compressed-tensors release whose schema this block follows (checked in tests with it).
COMPRESSED_TENSORS_SCHEMA = "0.20.0"

TEXT_PREFIXES = r"(language_model\.model|model\.language_model|model)\."
HEAD_PREFIXES = r"(language_model\.)?"
OTHER_PREFIXES = r"(model\.)?"
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def _split(name: str, layout: Layout) -> tuple[str, str]:
    """(prefix alternatives as a regex, the rest of the name) for a module name."""
    if name.startswith(layout.model_prefix):
        return TEXT_PREFIXES, name[len(layout.model_prefix) :]
    if name == layout.lm_head_key.removesuffix(".weight"):
        return HEAD_PREFIXES, "lm_head"
    return OTHER_PREFIXES, name


def _pattern(prefix: str, rest: str, numbered: bool) -> str:
    parts = [r"\d+" if numbered and part.isdigit() else re.escape(part) for part in rest.split(".")]
    return "re:^" + prefix + r"\.".join(parts) + "$"


def _family(prefix: str, rest: str) -> tuple[str, str]:
    return prefix, _NUMBER.sub("N", rest)


def module_patterns(chosen: list[str], everything: dict[str, object], layout: Layout) -> list[str]:
    """Patterns matching exactly the `chosen` modules among `everything` (name -> treatment).

    A family (same name but for layer / expert numbers) becomes one pattern when all of its
    members are chosen; otherwise each chosen member gets its own exact pattern.
    """
    chosen_set = set(chosen)
    families: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in everything:
        families[_family(*_split(name, layout))].append(name)
    patterns: list[str] = []
    seen: set[tuple[str, str]] = set()
    for name in chosen:
        prefix, rest = _split(name, layout)
        family = _family(prefix, rest)
        members = families[family]
        if all(member in chosen_set for member in members):
            if family not in seen:
                seen.add(family)
                patterns.append(_pattern(prefix, rest, numbered=len(members) > 1))
        else:
            patterns.append(_pattern(prefix, rest, numbered=False))
    return patterns


def weights_args(scheme: Scheme) -> dict[str, Any]:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": scheme.strategy,
        "group_size": scheme.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(plan: QuantPlan, layout: Layout) -> dict[str, Any]:
    """config_groups (one per scheme) and an ignore list covering every Linear left in source
    precision, the routers included (transformers' "Linear" matching would otherwise take them)."""
    linears = {item.module.name: item.scheme for item in plan.items if item.module.linear}
    by_scheme: dict[Scheme, list[str]] = {}
    for name, scheme in linears.items():
        if scheme is not None:
            by_scheme.setdefault(scheme, []).append(name)
    groups = {
        f"group_{index}": {
            "targets": module_patterns(modules, linears, layout),
            "weights": weights_args(scheme),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        for index, (scheme, modules) in enumerate(by_scheme.items())
    }
    unquantized = [name for name, scheme in linears.items() if scheme is None]
    # Patterns for transformers 5's module tree, then every checkpoint name spelled out for
    # runtimes that match names literally.
    ignore = module_patterns(unquantized, linears, layout) + unquantized
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": COMPRESSED_TENSORS_SCHEMA,
    }
