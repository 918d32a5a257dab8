"""What calibration keeps of a module's input: X^T X (and, paired, X^T X_r), in fp32."""

from __future__ import annotations

from collections.abc import Callable

import torch

from scoutq.quant.gptq import Factorized, factorize
from scoutq.quant.recipe import GptqSettings
from scoutq.stream.hooks import Windows


class InputStatistics:
    """Running X^T X (fp32) and token count of one module input; with a paired reference input
    (the same tokens through the source weights), also X^T X_r."""

    def __init__(self, features: int, paired: bool = False, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(features, features, device=device)
        self.cross = torch.zeros(features, features, device=device) if paired else None
        self.tokens = 0
        self._factorized: Factorized | None = None

    def factorized(self, options: GptqSettings, what: str) -> Factorized:
        """GPTQ's factorisation of this Hessian, computed once for all modules sharing the input."""
        if self._factorized is None:
            self._factorized = factorize(self.hessian, options, what)
        return self._factorized

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(x.t(), x)
        if self.cross is not None:
            if reference is None:
                raise ValueError("paired statistics need the reference input")
            self.cross.addmm_(x.t(), reference.reshape(-1, x.shape[-1]).float())
        self.tokens += x.shape[0]

    def add_windows(self, x: torch.Tensor, reference_input: torch.Tensor | None,
                    reference_fn: Callable[[torch.Tensor], torch.Tensor], windows: Windows) -> None:
        """Add rows x [N, F]; paired, with reference_fn(reference_input) as their reference rows,
        computed a window at a time (a SwiGLU intermediate is the widest activation, and the
        stream computes it window by window too)."""
        if reference_input is None:
            self.add(x)
            return
        for rows, reference_rows in zip(windows.split(x), windows.split(reference_input), strict=True):
            self.add(rows, reference_fn(reference_rows))

    @classmethod
    def of(cls, x: torch.Tensor, reference: torch.Tensor | None = None) -> InputStatistics:
        """Statistics of x; paired with `reference` (same rows, source-weight stream) if given."""
        stats = cls(x.shape[-1], paired=reference is not None, device=x.device)
        stats.add(x, reference)
        return stats
