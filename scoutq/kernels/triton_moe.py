"""A grouped w4a16 / w8a16 MoE kernel in Triton: every routed expert of a layer in one launch.

    tokens sorted by expert ─▶ blocks of BLOCK_M rows, each block one expert's
                                 │
          [one program per (row block, column block)]
                                 │  for each BLOCK_K slice of the input:
                                 │     load the packed words, unpack, (q - z) * scale  (fused)
                                 │     acc += rows @ weights                           (fp32)
                                 ▼
                        y for every (token, expert) pair, in sorted order

The weights are read in the layout scoutq writes (compressed-tensors pack-quantized: int32
words along the input dimension, element j of a word in bits [bits*j, bits*(j+1)), stored
unsigned with offset 2^(bits-1)), stacked over the experts once at load. One projection is
one launch: gate and up (fused rows) on the score-scaled token rows, then down on the SwiGLU
intermediate, which is already in sorted order. Accumulation is fp32. On a GPU the products are
bf16 (activations and dequantized weights rounded to bf16, as w4a16 kernels do); in Triton's
interpreter, which has no bf16 arithmetic, everything is fp32.

On CUDA tensors the kernel is compiled; with TRITON_INTERPRET=1 it runs on CPU tensors in
Triton's interpreter, so the same kernel is tested on machines without a GPU (the test suite
sets it where no GPU is visible: tests/conftest.py, tests/kernels/test_triton_moe.py).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from scoutq.errors import ScoutqError
from scoutq.quant.packed import PackedWeight

BLOCK_M = 16  # rows per program: tl.dot's smallest tile; one expert's tokens are padded to a multiple
BLOCK_N = 32
BLOCK_K = 32  # a multiple of 8 (int4 elements per word) dividing every group size used (32, 64, 128)


def _grouped_matmul_kernel(a_ptr, rows_ptr, row_scale_ptr, w_ptr, s_ptr, z_ptr, out_ptr, block_expert_ptr,
                   n_out, k_in, stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
                   stride_om, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                   HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + offs_m)
    valid = rows >= 0  # padding rows of an expert's last block are -1
    safe_rows = tl.where(valid, rows, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + offs_m, mask=valid, other=0.0).to(tl.float32)
    per_word: tl.constexpr = 32 // BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_in
        a = tl.load(a_ptr + safe_rows[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        if HAS_ROW_SCALE:  # Llama 4 scales the expert's input by the router score
            a = a * row_scale[:, None]
        w_mask = k_mask[:, None] & n_mask[None, :]
        words = tl.load(w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + (offs_k // per_word)[:, None],
                        mask=w_mask, other=0)
        shift = ((offs_k % per_word) * BITS)[:, None]
        q = ((words >> shift) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        group = (offs_k // GROUP)[:, None]
        scale = tl.load(s_ptr + expert * stride_se + offs_n[None, :] * stride_sn + group, mask=w_mask,
                        other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + expert * stride_ze + offs_n[None, :] * stride_zn + group, mask=w_mask, other=0)
            w = (q - zero).to(tl.float32) * scale
        else:
            w = q.to(tl.float32) * scale
        if DOT_BF16:  # GPUs: bf16 tensor-core products, fp32 accumulation (w4a16)
            acc += tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16))
        else:  # the interpreter (no bf16 arithmetic): fp32 throughout
            acc += tl.dot(a, w)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=valid[:, None] & n_mask[None, :])


@functools.cache
def _kernel() -> object:
    """The kernel, compiled for GPUs; under TRITON_INTERPRET=1 (set before triton is imported,
    since triton.language's own helpers are wrapped at import) Triton's interpreter runs it on
    CPU tensors instead."""
    return triton.jit(_grouped_matmul_kernel)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class StackedWeights:
    """One projection of every expert, stacked: packed words [E, out, words] int32, scales
    [E, out, groups], zero points [E, out, groups] int32 (asymmetric only)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group: int
    out_features: int
    in_features: int

    @classmethod
    def of(cls, weights: list[PackedWeight], device: torch.device | str) -> StackedWeights:
        first = weights[0]
        if any(w.scheme != first.scheme or w.shape != first.shape for w in weights):
            raise ValueError("every expert of a projection must share one scheme and shape")
        scheme, (out_features, in_features) = first.scheme, first.shape
        group = scheme.group_size or in_features
        if group % BLOCK_K or in_features % group:
            raise ValueError(f"the grouped kernel needs groups that are multiples of {BLOCK_K} dividing the input "
                             f"width (group {group}, input {in_features})")
        zero = None
        if first.zero_point is not None:
            zero = torch.stack([w.zero_point for w in weights]).to(device=device, dtype=torch.int32)  # type: ignore[misc]
        return cls(torch.stack([w.packed for w in weights]).to(device).contiguous(),
                   torch.stack([w.scale for w in weights]).to(device).contiguous(),
                   None if zero is None else zero.contiguous(), scheme.bits, group, out_features, in_features)


@dataclass(frozen=True)
class SortedRows:
    """Row indices into the activations, grouped by expert and padded to BLOCK_M per expert:
    `rows` [P] (-1 for padding), `pairs` [P] the (token, slot) pair each row computes (-1 for
    padding), `block_expert` [P / BLOCK_M] the expert of each block."""

    rows: torch.Tensor
    pairs: torch.Tensor
    block_expert: torch.Tensor

    @classmethod
    def of(cls, tokens: torch.Tensor, bounds: list[int], device: torch.device) -> SortedRows:
        """From the (token, slot) pairs grouped by expert: `tokens` [pairs], expert e's pairs
        [bounds[e], bounds[e + 1]) (model/moe.ExpertGroups)."""
        rows, pairs, block_expert = [], [], []
        for expert in range(len(bounds) - 1):
            start, stop = bounds[expert], bounds[expert + 1]
            if stop == start:
                continue  # an expert without tokens costs nothing
            blocks = -(-(stop - start) // BLOCK_M)
            padding = blocks * BLOCK_M - (stop - start)
            rows.append(F.pad(tokens[start:stop].to(torch.int32), (0, padding), value=-1))
            pairs.append(F.pad(torch.arange(start, stop, dtype=torch.int32, device=tokens.device),
                               (0, padding), value=-1))
            block_expert += [expert] * blocks
        if not rows:
            empty = torch.zeros(0, dtype=torch.int32, device=device)
            return cls(empty, empty, empty)
        return cls(torch.cat(rows).to(device), torch.cat(pairs).to(device),
                   torch.tensor(block_expert, dtype=torch.int32, device=device))


def grouped_matmul(a: torch.Tensor, sorted_rows: torch.Tensor, block_expert: torch.Tensor, weights: StackedWeights,
                   row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y[i] = (row_scale[i] * a[sorted_rows[i]]) @ W_e^T for every row i of the sorted blocks,
    e the expert of i's block; padding rows (-1) stay zero. -> [P, out] fp32."""
    out = torch.zeros(sorted_rows.shape[0], weights.out_features, dtype=torch.float32, device=a.device)
    if sorted_rows.shape[0] == 0:
        return out
    if a.device.type != "cuda" and not interpreted():
        raise ScoutqError("the Triton MoE kernel runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    kernel = _kernel()
    a = a.contiguous()
    zero = weights.zero_point
    grid = (block_expert.shape[0], -(-weights.out_features // BLOCK_N))
    kernel[grid](  # type: ignore[index]
        a, sorted_rows, row_scale if row_scale is not None else a, weights.packed, weights.scale,
        zero if zero is not None else weights.packed, out, block_expert,
        weights.out_features, weights.in_features, a.stride(0),
        weights.packed.stride(0), weights.packed.stride(1), weights.scale.stride(0), weights.scale.stride(1),
        zero.stride(0) if zero is not None else 0, zero.stride(1) if zero is not None else 0, out.stride(0),
        GROUP=weights.group, BITS=weights.bits, HAS_ROW_SCALE=row_scale is not None, HAS_ZERO=zero is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_BF16=a.device.type == "cuda",
    )
    return out


class TritonExperts:
    """A layer's routed experts for the grouped kernel: gate and up fused per expert [2F, D],
    down [D, F]. Called with the MoE block's input and its routing grouped by expert (the pairs'
    tokens and gate values, and each expert's range, as model/moe.ExpertGroups holds them);
    returns the routed sum [N, D]."""

    def __init__(self, gate_up: list[PackedWeight], down: list[PackedWeight], device: torch.device | str):
        self.gate_up = StackedWeights.of(gate_up, device)
        self.down = StackedWeights.of(down, device)
        self.num_experts = len(gate_up)

    def __call__(self, x: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        order = SortedRows.of(tokens, bounds, x.device)
        pair_scores = torch.where(order.pairs >= 0, scores[order.pairs.clamp(min=0).long()].float(), 0.0)
        hidden = grouped_matmul(x, order.rows, order.block_expert, self.gate_up, pair_scores)
        gate, up = hidden.chunk(2, dim=-1)
        intermediate = F.silu(gate) * up  # already in sorted order: its rows are the down inputs
        identity = torch.where(order.rows >= 0, torch.arange(order.rows.shape[0], device=x.device, dtype=torch.int32),
                               -1)
        y = grouped_matmul(intermediate, identity, order.block_expert, self.down)
        valid = order.pairs >= 0
        return torch.zeros(x.shape[0], self.down.out_features, dtype=torch.float32, device=x.device).index_add_(
            0, tokens[order.pairs[valid].long()], y[valid]).to(x.dtype)


class TritonLinear:
    """One packed Linear on the same kernel (a single "expert" holding every token): attention and
    the shared expert on GPUs, where recipes quantize them. Call on activations [..., in]."""

    def __init__(self, weight: PackedWeight, device: torch.device | str):
        self.weights = StackedWeights.of([weight], device)
        self.out_features, self.in_features = weight.shape
        self._order: tuple[int, SortedRows] | None = None

    def _rows(self, tokens: int, device: torch.device) -> SortedRows:
        if self._order is None or self._order[0] != tokens or self._order[1].rows.device != device:
            blocks = -(-tokens // BLOCK_M)
            rows = torch.arange(blocks * BLOCK_M, dtype=torch.int32, device=device)
            rows = torch.where(rows < tokens, rows, -1)
            self._order = (tokens, SortedRows(rows, rows, torch.zeros(blocks, dtype=torch.int32, device=device)))
        return self._order[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        order = self._rows(rows.shape[0], rows.device)
        y = grouped_matmul(rows, order.rows, order.block_expert, self.weights)[: rows.shape[0]]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
