"""A weight quantization scheme: bits, granularity, symmetry.

Only what scoutq writes and real runtimes load as compressed-tensors `pack-quantized`
(quantized-formats.md B1, B8): int8 or int4, per output channel or in groups along the
input dimension, symmetric or with a zero point. A GGUF recipe's scheme also names the ggml
block type it is stored as (`ggml`), whose scales are fp16 (`scale_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scheme:
    bits: int  # 4 or 8
    group_size: int | None  # None: one scale per output channel
    symmetric: bool = True
    scale_dtype: str | None = None  # None: the source weight's dtype; "float16" for ggml blocks
    ggml: str | None = None  # the ggml block type of a GGUF output (q4_0, q8_0, q4_k), else None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")

    @property
    def qmin(self) -> int:
        if self.ggml == "q8_0":  # ggml's x86 dot products take |q| with a sign instruction that overflows on -128
            return -127
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def strategy(self) -> str:
        """compressed-tensors' name for the granularity."""
        return "channel" if self.group_size is None else "group"

    def scales_dtype(self, source: torch.dtype) -> torch.dtype:
        """The dtype scales are computed and stored in: the scheme's own, else the source's."""
        return getattr(torch, self.scale_dtype) if self.scale_dtype else source

    def groups(self, in_features: int) -> int:
        """Scales per output row for a weight with `in_features` columns."""
        return 1 if self.group_size is None else -(-in_features // self.group_size)

    def describe(self) -> str:
        if self.ggml is not None:
            return self.ggml
        granularity = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{granularity}-{'sym' if self.symmetric else 'asym'}"
