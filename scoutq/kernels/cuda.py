"""The `cuda` backend's Linears: the grouped Triton kernel, or PyTorch's int8 GPU matmul.

Routed experts take the grouped kernel directly (model/quantized.py, `GroupedExperts`); every
other quantized Linear comes here. int8 per-channel symmetric weights go to PyTorch's
`_weight_int8pack_mm` (x @ (q * scale).T with bf16 activations: cpu.Int8CpuMatmul, on the GPU);
everything else (int4 groups, asymmetric int8) to the Triton kernel with one "expert".
Without a GPU, only TRITON_INTERPRET=1 makes this backend usable (Triton's interpreter on CPU
tensors: what the tests do); otherwise `--backend cuda` on a CPU is one error line.
"""

from __future__ import annotations

import torch

from scoutq.errors import ScoutqError
from scoutq.quant.packed import PackedWeight


def usable(device: torch.device | str) -> None:
    """Raise one clear line unless the backend can run on `device`."""
    try:
        from scoutq.kernels import triton_moe
    except ImportError:
        raise ScoutqError("backend 'cuda' needs triton (pip install triton; it comes with CUDA builds of torch)") \
            from None
    if torch.device(device).type != "cuda" and not triton_moe.interpreted():
        raise ScoutqError(f"backend 'cuda' runs on a GPU, not on {device} (or on the CPU under TRITON_INTERPRET=1, "
                          "for testing); use --backend cpu")


def cuda_matmul(weight: PackedWeight, device: torch.device | str) -> object:
    usable(device)
    scheme = weight.scheme
    if scheme.bits == 8 and scheme.group_size is None and scheme.symmetric and torch.device(device).type == "cuda":
        from scoutq.kernels.cpu import Int8CpuMatmul  # the same PyTorch op, on the GPU

        return Int8CpuMatmul(weight, device)
    from scoutq.kernels.triton_moe import TritonLinear

    return TritonLinear(weight, device)
