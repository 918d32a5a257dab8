"""Dense fp32 weights of a checkpoint, one module at a time, whether its source is bf16, a
scoutq-quantized compressed-tensors output or another tool's quantized checkpoint (scoutq.foreign:
packed weights are dequantized exactly as stored).

The layer stream reads through this, so the same walk calibrates a source checkpoint and
evaluates either kind layer by layer. Every read goes through the checkpoint's reader
(positioned reads). Routed experts come one expert at a time: that expert's rows of the fused
`gate_up_proj` / `down_proj` tensors of a source checkpoint, or the three per-expert modules of
a quantized one.
"""

from __future__ import annotations

import re

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import CheckpointError
from scoutq.foreign import WeightSource, weight_source

ROUTED_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.\d+\.")


class DenseWeights:
    """fp32 weights on `device`: read on the CPU (positioned reads), moved once, dequantized there."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device | str = "cpu"):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.layout = checkpoint.layout
        self.config_path = checkpoint.directory / "config.json"
        quantized = "quantization_config" in checkpoint.config_json
        self.source: WeightSource | None = weight_source(checkpoint) if quantized else None

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor (norm weights, router, biases) as fp32."""
        return self.checkpoint.read(key).to(self.device).float()

    def linear(self, module: str) -> torch.Tensor:
        """nn.Linear weight [out, in] of `module` (a key without `.weight`), fp32."""
        dequantized = self.source.dense(module) if self.source is not None else None
        if dequantized is not None:
            return dequantized.to(self.device).float()
        if f"{module}.weight" not in self.checkpoint.tensors:
            raise CheckpointError(f"{self.checkpoint.directory}: no weight for module {module!r}")
        return self.tensor(f"{module}.weight")

    def dtype(self, module: str) -> torch.dtype:
        """The dtype the module's weight (or its scales) is stored in."""
        tensors = self.checkpoint.tensors
        for suffix in ("weight_scale", "scales"):  # a quantized module: its scales' dtype
            if f"{module}.{suffix}" in tensors:
                return self.checkpoint.dtype(f"{module}.{suffix}")
        return self.checkpoint.dtype(f"{module}.weight")

    def stored_dtype(self, module: str) -> torch.dtype:
        """The dtype `module`'s weight is stored in; a routed expert's from its layer's fused tensor."""
        expert = ROUTED_EXPERT.search(module)
        return self.expert_dtype(int(expert.group(1))) if expert else self.dtype(module)

    def expert_dtype(self, layer: int) -> torch.dtype:
        fused = self.layout.gate_up_key(layer)
        if fused in self.checkpoint.tensors:
            return self.checkpoint.dtype(fused)
        return self.dtype(self.layout.layer_key(layer, "feed_forward.experts.0.gate_proj"))

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of one routed expert as nn.Linear weights [out, in], fp32."""
        if self.layout.gate_up_key(layer) in self.checkpoint.tensors:
            gate, up, down = self.checkpoint.read_expert(layer, expert)
            return gate.to(self.device).float(), up.to(self.device).float(), down.to(self.device).float()
        names = [self.layout.layer_key(layer, f"feed_forward.experts.{expert}.{p}_proj") for p in ("gate", "up", "down")]
        gate, up, down = (self.linear(name) for name in names)
        return gate, up, down
