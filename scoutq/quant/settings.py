"""Settings of the calibrated algorithms: a recipe's `gptq:` and `clip:` sections, which gptq.py
and clip.py take as they are.

Apart from recipe.py so that the algorithms need only pydantic, not the recipe loader (YAML,
the compressed-tensors schema). Frozen: a recipe's settings are part of its fingerprint, and the
layer walk keeps them in frozen (hashable) dataclasses.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class GptqSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    damp: Annotated[float, Field(ge=0, le=1)] = 0.01
    block_size: Annotated[int, Field(gt=0)] = 128
    act_order: bool = False
    mse_scales: bool = False
    # Symmetric scales signed so each group's largest-magnitude value lands on qmin: the grid
    # is absmax / 8, not / 7.5, at int4 (primitives.signed_scale). No effect on asymmetric.
    signed_scales: bool = False
    # Match the source model's outputs on its own inputs rather than the source weights on the
    # quantized path's inputs (GPTAQ; gptq.py). Runs a full-precision copy of the hidden states.
    fp_target: bool = False
    fp_target_damp: Annotated[float, Field(gt=0)] = 0.1
    # Router-aware rounding of the weights writing into the residual stream (o_proj, down_proj):
    # errors along later routers' directions cost 1 + router_weight times more (gptq.py). 0: off.
    router_weight: Annotated[float, Field(ge=0)] = 0.0
    row_blocks: Annotated[int, Field(gt=0)] = 8


class ClipSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: Annotated[int, Field(ge=1, le=200)] = 20  # 1: the full range only (round-to-nearest's scales)
    min_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    signed_scales: bool = False  # as GptqSettings.signed_scales

    def ratios(self) -> list[float]:
        """The fractions of each group's range the search tries, from 1 down to min_ratio."""
        step = (1.0 - self.min_ratio) / max(self.grid - 1, 1)
        return [1.0 - i * step for i in range(self.grid)]
