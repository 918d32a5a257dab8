"""Dense fp32 weights of a checkpoint, one module at a time, whether its source is bf16 or a
scoutq-quantized compressed-tensors output (packed weights are dequantized exactly as stored).

The layer walk reads through this, so the same walk calibrates a source checkpoint and
evaluates either kind layer by layer. Routed experts come one expert at a time: a slice of the
fused `gate_up_proj` / `down_proj` tensors of a source checkpoint (positioned reads, no mmap),
or the three per-expert modules of a quantized one.
"""

from __future__ import annotations

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.rows import read_rows
from scoutq.errors import CheckpointError
from scoutq.quant.ct_schema import group_for, parse_quantization_config
from scoutq.quant.packed import SUFFIXES, PackedWeight


class DenseWeights:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.layout = checkpoint.layout
        qconfig = checkpoint.config_json.get("quantization_config")
        self.config_path = checkpoint.directory / "config.json"
        self.groups, self.ignore = parse_quantization_config(self.config_path, qconfig) if qconfig else ([], ())

    def _read(self, key: str) -> torch.Tensor:
        """One stored tensor, as stored. Positioned reads, not safetensors' mmap: mapped pages
        would stay resident for the whole walk, so a walk over N layers would hold N layers."""
        info = self.checkpoint.info(key)
        if not info.shape:
            return self.checkpoint.read(key)
        return read_rows(info, 0, info.shape[0])

    def tensor(self, key: str) -> torch.Tensor:
        """A stored tensor (norm weights, router, biases) as fp32."""
        return self._read(key).float()

    def linear(self, module: str) -> torch.Tensor:
        """nn.Linear weight [out, in] of `module` (a key without `.weight`), fp32."""
        tensors = self.checkpoint.tensors
        if f"{module}.weight" in tensors:
            return self.tensor(f"{module}.weight")
        group = group_for(module, self.groups, self.ignore, self.config_path) if self.groups else None
        if group is None or f"{module}.weight_packed" not in tensors:
            raise CheckpointError(f"{self.checkpoint.directory}: no weight for module {module!r}")
        state = {s: self._read(f"{module}.{s}") for s in SUFFIXES if f"{module}.{s}" in tensors}
        return PackedWeight.from_state(state, group.scheme).dequantize().float()

    def dtype(self, module: str) -> torch.dtype:
        """The dtype the module's weight (or its scales) is stored in."""
        tensors = self.checkpoint.tensors
        key = f"{module}.weight" if f"{module}.weight" in tensors else f"{module}.weight_scale"
        return self.checkpoint.dtype(key)

    def expert_dtype(self, layer: int) -> torch.dtype:
        fused = self.layout.gate_up_key(layer)
        if fused in self.checkpoint.tensors:
            return self.checkpoint.dtype(fused)
        return self.dtype(self.layout.layer_key(layer, "feed_forward.experts.0.gate_proj"))

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of one routed expert as nn.Linear weights [out, in], fp32."""
        fused = self.layout.gate_up_key(layer)
        if fused in self.checkpoint.tensors:
            width = self.checkpoint.config.intermediate_size
            gate_up = read_rows(self.checkpoint.info(fused), expert, expert + 1)[0]  # [D, 2F], stored [in, out]
            down = read_rows(self.checkpoint.info(self.layout.down_key(layer)), expert, expert + 1)[0]  # [F, D]
            return gate_up[:, :width].t().float(), gate_up[:, width:].t().float(), down.t().float()
        names = [self.layout.layer_key(layer, f"feed_forward.experts.{expert}.{p}_proj") for p in ("gate", "up", "down")]
        gate, up, down = (self.linear(name) for name in names)
        return gate, up, down
