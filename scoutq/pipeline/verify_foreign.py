"""`scoutq verify --foreign`: check a quantized checkpoint another tool wrote, before judging it.

There is no scoutq manifest to hash against, so the check is structural and numeric: every
Linear the Llama 4 text model needs is found, quantized (decoded by its format's reader,
scoutq.foreign) or stored in full precision; each decodes to the [out, in] shape config.json
implies, with finite values; the router, which every runtime keeps in full precision, is named
when a tool quantized it. One module is resident at a time. The first problem is one line
naming the module and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scoutq.checkpoint.config import TextConfig
from scoutq.checkpoint.reader import Checkpoint, require_directory
from scoutq.errors import CheckpointError
from scoutq.foreign import weight_source


@dataclass
class ForeignReport:
    directory: str
    format: str
    quantized_modules: int
    full_precision_modules: int
    quantized_routers: list[str] = field(default_factory=list)


def _linears(config: TextConfig, key: Callable[[int, str], str]) -> Iterator[tuple[str, tuple[int, int], bool]]:
    """(module, [out, in], routed expert?) of every decoder Linear, experts per expert."""
    width, heads, kv = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    for i in range(config.num_hidden_layers):
        for proj, shape in (("q", (heads, width)), ("k", (kv, width)), ("v", (kv, width)), ("o", (width, heads))):
            yield key(i, f"self_attn.{proj}_proj"), shape, False
        if config.is_moe_layer(i):
            hidden = config.intermediate_size
            yield key(i, "feed_forward.router"), (config.num_local_experts, width), False
            for proj, shape in (("gate", (hidden, width)), ("up", (hidden, width)), ("down", (width, hidden))):
                yield key(i, f"feed_forward.shared_expert.{proj}_proj"), shape, False
                for expert in range(config.num_local_experts):
                    yield key(i, f"feed_forward.experts.{expert}.{proj}_proj"), shape, True
        else:
            hidden = config.intermediate_size_mlp
            for proj, shape in (("gate", (hidden, width)), ("up", (hidden, width)), ("down", (width, hidden))):
                yield key(i, f"feed_forward.{proj}_proj"), shape, False


def verify_foreign(path: str | Path, on_module: Callable[[int, int], None] | None = None) -> ForeignReport:
    """Check every decoder Linear of a quantized checkpoint; raise ScoutqError at the first problem."""
    directory = require_directory(path, "a quantized checkpoint directory")
    checkpoint = Checkpoint.open(directory)
    source = weight_source(checkpoint)
    config, layout = checkpoint.config, checkpoint.layout
    modules = list(_linears(config, layout.layer_key))
    fused = {i for i in range(config.num_hidden_layers) if layout.gate_up_key(i) in checkpoint.tensors}
    report = ForeignReport(str(directory), source.format, 0, 0)
    for done, (module, shape, routed) in enumerate(modules, 1):
        layer = int(module.split("layers.")[1].split(".")[0])
        if routed and layer in fused:  # stored fused in full precision: the bf16 loader's shapes
            report.full_precision_modules += 1
            continue
        weight = source.dense(module)
        if weight is None:
            key = f"{module}.weight"
            if key not in checkpoint.tensors:
                raise CheckpointError(f"{directory}: module {module!r} is neither quantized nor stored as {key}")
            weight = checkpoint.read(key)
            report.full_precision_modules += 1
        else:
            report.quantized_modules += 1
            if module.endswith("feed_forward.router"):
                report.quantized_routers.append(module)
        if tuple(weight.shape) != shape:
            raise CheckpointError(f"{directory}: module {module!r} decodes to shape {list(weight.shape)}; config.json "
                                  f"implies {list(shape)}")
        if not bool(torch.isfinite(weight).all()):
            raise CheckpointError(f"{directory}: module {module!r} decodes to non-finite values")
        if on_module is not None:
            on_module(done, len(modules))
    return report
