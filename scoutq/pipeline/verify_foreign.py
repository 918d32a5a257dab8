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

from scoutq.checkpoint.layout import expected_text_shapes
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


def _linears(checkpoint: Checkpoint) -> Iterator[tuple[str, tuple[int, ...], str | None]]:
    """(module, [out, in], the fused tensor it would sit in) of every decoder Linear config.json
    implies (`expected_text_shapes`), routed experts one by one; the fused key is None elsewhere."""
    layers = f"{checkpoint.layout.model_prefix}layers."
    for key, shape in expected_text_shapes(checkpoint.config, checkpoint.layout).items():
        if not key.startswith(layers):
            continue
        if key.endswith("experts.gate_up_proj"):  # [E, in, 2 out]: gate and up of every expert
            experts, width, doubled = shape
            for expert in range(experts):
                for proj in ("gate", "up"):
                    yield f"{key.removesuffix('gate_up_proj')}{expert}.{proj}_proj", (doubled // 2, width), key
        elif key.endswith("experts.down_proj"):  # [E, in, out]
            experts, hidden, width = shape
            for expert in range(experts):
                yield f"{key.removesuffix('down_proj')}{expert}.down_proj", (width, hidden), key
        elif key.endswith(".weight") and len(shape) == 2:
            yield key.removesuffix(".weight"), shape, None


def verify_foreign(path: str | Path, on_module: Callable[[int, int], None] | None = None) -> ForeignReport:
    """Check every decoder Linear of a quantized checkpoint; raise ScoutqError at the first problem."""
    directory = require_directory(path, "a quantized checkpoint directory")
    checkpoint = Checkpoint.open(directory)
    source = weight_source(checkpoint)
    modules = list(_linears(checkpoint))
    report = ForeignReport(str(directory), source.format, 0, 0)
    for done, (module, shape, fused) in enumerate(modules, 1):
        if fused is not None and fused in checkpoint.tensors:  # stored fused in full precision, as the source
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
