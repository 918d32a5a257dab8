"""Reading compressed-tensors' quantization_config: which scheme quantizes which module.

Shared by `scoutq verify` (which checks an output against it) and the quantized runtime
(which builds its modules from it). Matching follows compressed-tensors: a `re:` target is
re.match'ed against the checkpoint module name, "Linear" matches every Linear, anything else
is an exact module name; ignore wins over targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoutq.checkpoint.config import TextConfig, parse_text_config, read_config_json
from scoutq.errors import ConfigError
from scoutq.quant.scheme import Scheme


@dataclass(frozen=True)
class QuantGroup:
    name: str  # the config_groups key, e.g. "group_0"
    scheme: Scheme
    targets: tuple[str, ...]
    format: str = "pack-quantized"  # how its weights are stored (foreign checkpoints: also naive / int)
    per_tensor: bool = False  # strategy "tensor": one scale [1] for the whole weight (foreign only)


FOREIGN_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized")
# actorder values whose stored weights the readers decode: "static" and "weight" (llm-compressor's
# GPTQ defaults) only reorder GPTQ's column sweep; "group" (True in old configs; compressed-tensors
# 0.20 dropped it, its checkpoints remain) adds `weight_g_idx`, which the readers apply.
ACTORDERS = (None, False, True, "static", "weight", "group")


def read_quantized_config(dst: Path) -> tuple[dict[str, Any], TextConfig, dict[str, Any]]:
    path = dst / "config.json"
    config_json = read_config_json(dst)
    try:
        config = parse_text_config(config_json)
    except ConfigError as bad:
        raise ConfigError(f"{dst}: {bad}") from None
    qconfig = config_json.get("quantization_config")
    if not isinstance(qconfig, dict):
        raise ConfigError(f"{path}: no quantization_config; not a quantized checkpoint")
    for key, want in (("quant_method", "compressed-tensors"), ("format", "pack-quantized"),
                      ("quantization_status", "compressed")):
        if qconfig.get(key) != want:
            raise ConfigError(f"{path}: quantization_config.{key} is {qconfig.get(key)!r}; expected {want!r}")
    return config_json, config, qconfig


def _scheme(path: Path, group: str, weights: Any, foreign: bool = False) -> tuple[Scheme, bool]:
    """The group's Scheme, and whether it is per-tensor (foreign checkpoints only)."""
    where = f"{path}: quantization_config.config_groups.{group}.weights"
    if not isinstance(weights, dict):
        raise ConfigError(f"{where}: missing; only weight quantization is written by scoutq")
    if weights.get("type", "int") != "int":
        raise ConfigError(f"{where}.type is {weights.get('type')!r}; expected 'int'")
    for field, allowed in (("dynamic", (False, None)), ("block_structure", (None,)),
                           ("actorder", ACTORDERS if foreign else (None, False))):
        if weights.get(field) not in allowed:
            raise ConfigError(f"{where}.{field} = {weights.get(field)!r} is not supported (it changes how the "
                              "stored weights decode)")
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    if foreign and strategy == "tensor":
        if group_size is not None:
            raise ConfigError(f"{where}: strategy 'tensor' with group_size {group_size!r}; expected null")
        strategy = "channel"  # one scale broadcast to every row: the channel layout with equal scales
        per_tensor = True
    else:
        per_tensor = False
    if strategy == "channel" and group_size is not None:
        raise ConfigError(f"{where}: strategy 'channel' with group_size {group_size!r}; expected null")
    if strategy == "group" and not isinstance(group_size, int):
        raise ConfigError(f"{where}: strategy 'group' needs an integer group_size, got {group_size!r}")
    if strategy not in ("channel", "group"):
        raise ConfigError(f"{where}.strategy is {strategy!r}; expected 'channel' or 'group'")
    symmetric = weights.get("symmetric")
    if not isinstance(symmetric, bool):
        raise ConfigError(f"{where}.symmetric is {symmetric!r}; expected true or false")
    try:
        return Scheme(int(weights.get("num_bits")), group_size, symmetric), per_tensor  # type: ignore[arg-type]
    except (TypeError, ValueError) as bad:
        raise ConfigError(f"{where}: {bad}") from None


def pattern_error(target: str) -> str | None:
    """Why a `re:` target does not compile (None when it does, or is not a pattern)."""
    if not target.startswith("re:"):
        return None
    try:
        re.compile(target[3:])
    except re.error as bad:
        return str(bad)
    return None


def _targets(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"{path}: quantization_config.{where} must be a list of strings")
    for target in value:
        if (bad := pattern_error(target)) is not None:
            raise ConfigError(f"{path}: quantization_config.{where}: invalid pattern {target!r} ({bad})")
    return tuple(value)


def parse_quantization_config(path: Path, qconfig: dict[str, Any],
                              foreign: bool = False) -> tuple[list[QuantGroup], tuple[str, ...]]:
    """The weight-only groups (in order) and the ignore list.

    foreign=False is what scoutq writes (and `verify` holds its outputs to): pack-quantized,
    channel or group. foreign=True also reads what llm-compressor writes for weight-only schemes:
    naive- and int-quantized storage, per-tensor scales, actorder (static, or group with
    `weight_g_idx`), each group's own `format` under a `mixed-precision` config.
    """
    raw_groups = qconfig.get("config_groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise ConfigError(f"{path}: quantization_config.config_groups is missing or empty")
    formats = FOREIGN_FORMATS if foreign else ("pack-quantized",)
    default_format = qconfig.get("format", "pack-quantized") if foreign else "pack-quantized"
    groups = []
    for name, group in raw_groups.items():
        if not isinstance(group, dict):
            raise ConfigError(f"{path}: quantization_config.config_groups.{name} is not an object")
        stored = group.get("format") or default_format
        if stored not in formats:
            raise ConfigError(f"{path}: quantization_config.config_groups.{name}.format is {stored!r}; "
                              f"expected {' or '.join(repr(f) for f in formats)}")
        for key in ("input_activations", "output_activations"):
            if group.get(key) is not None:
                raise ConfigError(f"{path}: quantization_config.config_groups.{name}.{key} is set; "
                                  "only weight-only schemes are supported (activation quantization changes "
                                  "the numerics the runtime would compute)")
        scheme, per_tensor = _scheme(path, name, group.get("weights"), foreign)
        groups.append(QuantGroup(name, scheme, _targets(path, f"config_groups.{name}.targets", group.get("targets")),
                                 stored, per_tensor))
    ignore = _targets(path, "ignore", qconfig.get("ignore", []))
    return groups, ignore


def target_matches(target: str, module: str) -> bool:
    """compressed-tensors' name matching: `re:` + a pattern re.match'ed against the module name,
    "Linear" (its class-name target: every Linear), or an exact module name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or target == module


def group_for(module: str, groups: list[QuantGroup], ignore: tuple[str, ...], config_path: Path) -> QuantGroup | None:
    """The group that quantizes a Linear module, or None if it stays in source precision."""
    if any(target_matches(target, module) for target in ignore):
        return None
    matched = [group for group in groups if any(target_matches(target, module) for target in group.targets)]
    if len({group.scheme for group in matched}) > 1:
        names = ", ".join(group.name for group in matched)
        raise ConfigError(f"{config_path}: module {module!r} matches the targets of several config_groups ({names}) "
                          "with different schemes")
    return matched[0] if matched else None
