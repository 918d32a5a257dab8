"""Quantized checkpoints other tools write, read as scoutq's weights: the neutral judge's input.

`weight_source(checkpoint)` reads config.json's `quantization_config` and returns the reader of
that format. For each Linear module the runtime asks it for the weight:

    None          the module is stored in full precision (`M.weight`, read as usual)
    PackedWeight  the producer's integers and scales, repacked without changing a bit, so the
                  packed kernels run it (compressed-tensors, GPTQ and AWQ with groups in order)
    Tensor        the dense weight, dequantized exactly as the producer's own decoder does, in
                  its dtype (act-order GPTQ, `weight_g_idx`, bitsandbytes)

Formats (quantized-formats.md B1-B7): compressed-tensors (`pack-quantized`, `naive-quantized`,
`int-quantized` weights; `mixed-precision` per group), GPTQ (`qweight`/`qzeros`/`scales`/`g_idx`;
GPTQModel's v1 and v2 zero points, desc_act; AutoRound's `auto_round:auto_gptq` packing), AWQ
GEMM and bitsandbytes 4-bit (nf4, fp4) and 8-bit. A field that would change the numerics and is
not supported is one line naming the field and its value; fields that do not change the stored
weights (observers, actorder static, damping, versions) are accepted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import CheckpointError, ConfigError, one_line
from scoutq.quant.packed import PackedWeight

ModuleWeight = PackedWeight | torch.Tensor


class WeightSource(ABC):
    """The quantized weights of one checkpoint, module by module (checkpoint module names)."""

    format: str  # what the report prints, e.g. "GPTQ (GPTQModel v1 zero points), int4 g128"

    def __init__(self, checkpoint: Checkpoint, qconfig: dict[str, Any]):
        self.checkpoint = checkpoint
        self.qconfig = qconfig
        self.config_path = checkpoint.directory / "config.json"

    def weight(self, module: str) -> ModuleWeight | None:
        """The module's weight [out, in] (None: stored in full precision as `module.weight`).

        Tensors that do not fit together (a shape, a group index out of range) are one line
        naming the module, whatever the format: they are bad input, not a bug."""
        try:
            return self.decode(module)
        except (RuntimeError, IndexError, KeyError, ValueError) as bad:
            raise CheckpointError(f"{self.checkpoint.directory}: module {module!r} does not decode as "
                                  f"{self.format}: {one_line(bad)}") from bad

    @abstractmethod
    def decode(self, module: str) -> ModuleWeight | None:
        """The format's own reading of `weight`."""

    def dense(self, module: str) -> torch.Tensor | None:
        """The module's dequantized weight [out, in] in its scale dtype (None: not quantized)."""
        found = self.weight(module)
        return found.dequantize() if isinstance(found, PackedWeight) else found

    def refuse(self, field: str, value: object, why: str) -> ConfigError:
        return ConfigError(f"{self.config_path}: quantization_config.{field} = {value!r}: {why}")


def quantization_config(path: Path, config_json: dict[str, Any]) -> dict[str, Any]:
    qconfig = config_json.get("quantization_config")
    if not isinstance(qconfig, dict):
        raise ConfigError(f"{path / 'config.json'}: no quantization_config; not a quantized checkpoint")
    return qconfig


def weight_source(checkpoint: Checkpoint) -> WeightSource:
    """The reader of the checkpoint's quantized format; one line naming what is not supported."""
    qconfig = quantization_config(checkpoint.directory, checkpoint.config_json)
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        from scoutq.foreign.ct import CompressedTensorsSource

        return CompressedTensorsSource(checkpoint, qconfig)
    if method in ("gptq", "auto-round", "autoround", "gptqmodel"):
        packing = str(qconfig.get("packing_format", "auto_gptq"))
        if "awq" in packing:
            from scoutq.foreign.awq import AwqSource

            return AwqSource(checkpoint, qconfig)
        from scoutq.foreign.gptq import GptqSource

        return GptqSource(checkpoint, qconfig)
    if method == "awq":
        from scoutq.foreign.awq import AwqSource

        return AwqSource(checkpoint, qconfig)
    if method == "bitsandbytes":
        from scoutq.foreign.bnb import BitsAndBytesSource

        return BitsAndBytesSource(checkpoint, qconfig)
    raise ConfigError(f"{checkpoint.directory / 'config.json'}: quantization_config.quant_method = "
                      f"{qconfig.get('quant_method')!r} is not a format scoutq reads (compressed-tensors, gptq, "
                      "auto-round, awq, bitsandbytes)")
