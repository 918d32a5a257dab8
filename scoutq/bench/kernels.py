"""Kernel and MoE-layer timings at real Scout shapes, against dense bf16 and fp32.

`scoutq bench kernels`: one expert projection, W [8192, 5120] (Scout's expert width x hidden),
for 1, 4, 16, 64, 256 and 1,024 tokens: fp32 `mm` (W.T contiguous, MKL's best layout), bf16
`F.linear`, scoutq's int8 and int4 (g128) CPU kernels as the cpu backend dispatches them (the
method column says which ran), and bitsandbytes nf4 / int8 when installed.
`scoutq bench moe`: one MoE layer (16 experts top-1 + shared expert, hidden 5120) in bf16,
int8 and int4, uniform random routing, at the same token counts.
`scoutq bench crossover`: the packed kernel against the tile path (tiles.py) on the same
weight, 1 to 128 tokens: the measurement behind cpu.TILES_FROM_TOKENS.

Reported per row: median time, speed relative to bf16, and effective weight bandwidth (bytes
of weights the step must read / time) as a fraction of a memory read bandwidth measured in
the same run (a sum over 512 MB of fp32). Each kernel row cycles through copies of its weight
totalling at least ROTATE_BYTES, so a weight smaller than the last-level cache (int4 W is
21 MB) is read from memory, as a real model's weights are, not from cache.

"int4 g128" is what the cpu backend picks (scoutq's own AVX-512 BF16 kernel where it runs,
native.py); "int4 g128 torch" is PyTorch's `_weight_int4pack_mm_for_cpu` on the same weight.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

from scoutq.kernels import Backend, native, prepare
from scoutq.kernels.cpu import Int4CpuMatmul
from scoutq.model.quantized import method_of
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme

HIDDEN, EXPERT_WIDTH, EXPERTS = 5120, 8192, 16
TOKENS = (1, 4, 16, 64, 256, 1024)
CROSSOVER_TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
ROTATE_BYTES = 256 * 1024 * 1024  # several times any CPU's last-level cache


@dataclass
class Row:
    bench: str
    variant: str
    tokens: int
    ms: float
    speedup_vs_bf16: float
    weight_gb_s: float
    fraction_of_read_bw: float
    method: str = ""


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(device: str = "cpu") -> float:
    """Bytes per second for a streaming read (a sum over 512 MB of fp32) on `device`."""
    buffer = torch.ones(128 * 1024 * 1024, device=device)
    seconds = median_seconds(lambda: float(buffer.sum()), repeats=5, warmup=1)
    return buffer.numel() * 4 / seconds


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator) * 0.02).to(torch.bfloat16)


def _packed_bytes(scheme: Scheme, out_features: int, in_features: int) -> int:
    groups = in_features // (scheme.group_size or in_features)
    return out_features * in_features * scheme.bits // 8 + out_features * groups * 2


def _rotating(kernel: Callable[[torch.Tensor], torch.Tensor], nbytes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call copies of `kernel` (its tensors cloned) in turn, ROTATE_BYTES of weights in all."""
    def cloned(obj: object) -> object:  # tensors cloned, also those of the kernels a dispatcher holds
        clone = copy.copy(obj)
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                setattr(clone, name, value.clone())
            elif hasattr(value, "__dict__") and hasattr(value, "in_features"):
                setattr(clone, name, cloned(value))
        return clone

    copies = [kernel] + [cloned(kernel) for _ in range(math.ceil(ROTATE_BYTES / nbytes) - 1)]
    turn = itertools.cycle(copies)
    return lambda x: next(turn)(x)


Variant = tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, int, Callable[[int], str]]


def kernel_rows(with_bnb: bool = True) -> list[Row]:
    bandwidth = read_bandwidth()
    w = _weight(EXPERT_WIDTH, HIDDEN, 0)
    fp32_copies = itertools.cycle([w.float().t().contiguous() for _ in range(math.ceil(ROTATE_BYTES / (w.numel() * 4)))])
    bf16_copies = itertools.cycle([w.clone() for _ in range(math.ceil(ROTATE_BYTES / (w.numel() * 2)))])
    variants: dict[str, Variant] = {
        "fp32 mm": (lambda x: x @ next(fp32_copies), torch.float32, w.numel() * 4, lambda t: "MKL sgemm"),
        "bf16 linear": (lambda x: F.linear(x, next(bf16_copies)), torch.bfloat16, w.numel() * 2,
                        lambda t: "F.linear bf16"),
    }
    for scheme in (Scheme(8, None), Scheme(4, 128)):
        packed = rtn_quantize(w, scheme)
        nbytes = _packed_bytes(scheme, *w.shape)
        name = f"int{scheme.bits} " + ("g128" if scheme.group_size else "channel")
        kernel = prepare(packed, Backend.CPU)
        variants[name] = (_rotating(kernel, nbytes), torch.bfloat16, nbytes, lambda t, k=kernel: method_of(k, t))
        if scheme.bits == 4 and native.library() is not None:
            variants[f"{name} torch"] = (_rotating(Int4CpuMatmul(packed), nbytes), torch.bfloat16, nbytes,
                                         lambda t: "Int4CpuMatmul")
        if with_bnb:
            try:
                bnb_kernel = prepare(packed, Backend.BNB)
            except Exception:  # bitsandbytes missing or without a CPU path here
                continue
            name = "bnb nf4" if scheme.bits == 4 else "bnb int8"
            nbytes = w.numel() // 2 + w.numel() // 64 * 4 if scheme.bits == 4 else w.numel() + w.shape[0] * 4
            variants[name] = (bnb_kernel, torch.bfloat16 if scheme.bits == 4 else torch.float32, nbytes,
                              lambda t, n=name: n)
    return _time_variants("kernels", variants, bandwidth)


def crossover_rows() -> tuple[list[Row], dict[int, int | None]]:
    """The packed kernel and the tile path on one expert projection at CROSSOVER_TOKENS, per
    bits; returns the rows and, per bits, the smallest token count from which the tile path is
    faster at every larger count measured (None: never)."""
    from scoutq.kernels.cpu import TokenDispatch

    bandwidth = read_bandwidth()
    w = _weight(EXPERT_WIDTH, HIDDEN, 0)
    rows: list[Row] = []
    crossover: dict[int, int | None] = {}
    for scheme in (Scheme(8, None), Scheme(4, 128)):
        kernel = prepare(rtn_quantize(w, scheme), Backend.CPU)
        if not isinstance(kernel, TokenDispatch):
            crossover[scheme.bits] = None
            continue
        nbytes = _packed_bytes(scheme, *w.shape)
        few, many = _rotating(kernel.few, nbytes), _rotating(kernel.many, nbytes)
        faster = {}
        for tokens in CROSSOVER_TOKENS:
            x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
            packed_s, tiles_s = median_seconds(partial(few, x)), median_seconds(partial(many, x))
            faster[tokens] = tiles_s < packed_s
            for method, seconds in ((type(kernel.few).__name__, packed_s), ("tiles", tiles_s)):
                rows.append(Row("crossover", f"int{scheme.bits}", tokens, round(seconds * 1e3, 3),
                                round(packed_s / seconds, 2), round(nbytes / seconds / 1e9, 2),
                                round(nbytes / seconds / bandwidth, 3), method))
        counts = list(CROSSOVER_TOKENS)
        crossover[scheme.bits] = next((t for i, t in enumerate(counts) if all(faster[u] for u in counts[i:])), None)
    return rows, crossover


def _time_variants(bench: str, variants: dict[str, Variant], bandwidth: float,
                   bytes_for_tokens: Callable[[str, int], int] | None = None) -> list[Row]:
    rows: list[Row] = []
    for tokens in TOKENS:
        timings = {}
        repeats = 7 if tokens <= 64 else 3  # a bf16 step at 1,024 tokens takes seconds here
        for name, (fn, dtype, nbytes, _) in variants.items():
            x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)).to(dtype)
            timings[name] = (median_seconds(partial(fn, x), repeats=repeats, warmup=1 if tokens > 64 else 2),
                             bytes_for_tokens(name, tokens) if bytes_for_tokens else nbytes)
        bf16 = next(seconds for name, (seconds, _) in timings.items() if name.startswith("bf16"))
        for name, (seconds, nbytes) in timings.items():
            rows.append(Row(bench, name, tokens, round(seconds * 1e3, 3), round(bf16 / seconds, 2),
                            round(nbytes / seconds / 1e9, 2), round(nbytes / seconds / bandwidth, 3),
                            variants[name][3](tokens)))
    return rows


def moe_rows(device: str = "cpu") -> list[Row]:
    """One Scout MoE layer step (router, top-1 grouped experts, shared expert) on `device`: the
    cpu backend on the CPU; on a GPU the cuda backend (the grouped Triton kernel for the experts)."""
    from scoutq.checkpoint.config import parse_text_config
    from scoutq.fixtures import presets
    from scoutq.model.moe import MoE
    from scoutq.model.quantized import GroupedExperts, QuantExperts, QuantLinear, concat_rows

    on_gpu = torch.device(device).type == "cuda"
    backend = Backend.CUDA if on_gpu else Backend.CPU
    bandwidth = read_bandwidth(device)
    config = parse_text_config(presets.scout_text_config(1))
    dense = MoE(config).to(torch.bfloat16).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in dense.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    expert_bytes = 3 * EXPERT_WIDTH * HIDDEN  # values per expert (gate, up, down)

    def quantized(scheme: Scheme) -> MoE:
        layer = MoE(config).to(torch.bfloat16).requires_grad_(False)
        layer.router = dense.router
        fused = [concat_rows([rtn_quantize(dense.experts.gate_up[e][:EXPERT_WIDTH], scheme),
                              rtn_quantize(dense.experts.gate_up[e][EXPERT_WIDTH:], scheme)]) for e in range(EXPERTS)]
        downs = [rtn_quantize(dense.experts.down[e], scheme) for e in range(EXPERTS)]
        if on_gpu:
            layer.experts = GroupedExperts(fused, downs, device)  # type: ignore[assignment]
        else:
            layer.experts = QuantExperts([prepare(w, backend) for w in fused],  # type: ignore[assignment]
                                         [prepare(w, backend) for w in downs])
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.shared_expert, name, QuantLinear(prepare(
                rtn_quantize(getattr(dense.shared_expert, name).weight, scheme), backend, device)))
        return layer.to(device)

    int8, int4 = quantized(Scheme(8, None)), quantized(Scheme(4, 128))  # quantized on the CPU, then moved
    layers = {"bf16 MoE": (dense.to(device), 2.0), "scoutq int8 MoE": (int8, 1.0),
              "scoutq int4-g128 MoE": (int4, 0.5 + 2 / 128)}

    def step_bytes(name: str, tokens: int) -> int:
        # Uniform top-1 routing touches 16 * (1 - (15/16)^tokens) experts on average, plus the shared one.
        active = EXPERTS * (1 - (1 - 1 / EXPERTS) ** tokens) + 1
        return int(active * expert_bytes * layers[name][1])

    def method(layer: MoE, tokens: int) -> str:
        """The kernels of the shared expert (all tokens) and of a routed expert (about 1/16 of them)."""
        shared = layer.shared_expert.gate_proj
        if not isinstance(shared, QuantLinear):
            return "F.linear bf16"
        if isinstance(layer.experts, GroupedExperts):
            return f"shared {method_of(shared.matmul, tokens)}; routed triton grouped MoE"
        routed = method_of(layer.experts.gate_up[0], max(1, round(tokens / EXPERTS)))  # type: ignore[union-attr]
        return f"shared {method_of(shared.matmul, tokens)}; routed {routed}"

    def timed(module: MoE) -> Callable[[torch.Tensor], torch.Tensor]:
        def step(x: torch.Tensor) -> torch.Tensor:
            y = module(x.to(device))
            if on_gpu:
                torch.cuda.synchronize()
            return y
        return step

    variants: dict[str, Variant] = {name: (timed(module), torch.bfloat16, 0, lambda t, m=module: method(m, t))
                                    for name, (module, _) in layers.items()}
    with torch.no_grad():
        return _time_variants("moe", variants, bandwidth, step_bytes)


def as_dicts(rows: list[Row]) -> list[dict[str, object]]:
    return [asdict(row) for row in rows]
