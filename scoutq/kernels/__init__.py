"""Fused dequant-matmul paths for quantized weights, behind one selection function.

    y = x @ dequantize(W).T        for a PackedWeight W [out, in], x [tokens, in]

Backends (str-enum `Backend`):
  * reference: dequantize, then matmul. The oracle every other backend is tested against.
  * cpu: PyTorch's packed CPU kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`),
    fed bf16 activations (with fp32 activations both take a path 5-30x slower; field-notes F).
  * bnb: bitsandbytes' 4-bit (nf4) / 8-bit matmuls, re-quantized from the dequantized weight:
    a different format, offered as the alternative users know, so its tolerance is looser.
  * cuda: GPUs. Routed experts run in one grouped Triton kernel per projection (triton_moe.py,
    dequantization fused, fp32 accumulation); other quantized Linears on the same kernel, except
    int8 per-channel symmetric ones, which take PyTorch's `_weight_int8pack_mm`. Under
    TRITON_INTERPRET=1 the same code runs on CPU tensors in Triton's interpreter (the tests).
Each backend repacks a weight once (`prepare`), then multiplies many times.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

import torch

from scoutq.errors import ScoutqError
from scoutq.quant.packed import PackedWeight


class Backend(StrEnum):
    REFERENCE = "reference"
    CPU = "cpu"
    BNB = "bnb"
    CUDA = "cuda"


class QuantMatmul(Protocol):
    """A weight prepared for one backend: call it on activations [tokens, in]."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def default_backend(device: torch.device | str) -> Backend:
    return Backend.CPU if torch.device(device).type == "cpu" else Backend.CUDA


def prepare(weight: PackedWeight, backend: Backend, device: torch.device | str = "cpu") -> QuantMatmul:
    """Repack `weight` for `backend`; schemes a backend cannot run fall back to the reference."""
    if backend == Backend.REFERENCE:
        from scoutq.kernels.reference import ReferenceMatmul

        return ReferenceMatmul(weight, device)
    if backend == Backend.CPU:
        if torch.device(device).type != "cpu":
            raise ScoutqError(f"backend 'cpu' runs on the CPU, not on {device}")
        from scoutq.kernels.cpu import cpu_matmul

        return cpu_matmul(weight)
    if backend == Backend.BNB:
        from scoutq.kernels.bnb import BnbMatmul

        return BnbMatmul(weight, device)
    if backend == Backend.CUDA:
        from scoutq.kernels.cuda import cuda_matmul

        return cuda_matmul(weight, device)
    raise ScoutqError(f"unknown backend {backend!r}; choose one of {', '.join(b.value for b in Backend)}")
