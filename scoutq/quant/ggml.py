"""ggml's block formats: Q4_0, Q8_0 and Q4_K, packed from and unpacked to torch tensors.

A GGUF tensor of these types is a run of fixed-size blocks along each row (ggml's
`ggml-common.h`; quantized-formats.md B6):

    Q4_0  32 weights in 18 bytes: fp16 d, then 16 bytes; byte j holds element j in its low
          nibble and element j+16 in its high nibble; value = (nibble - 8) * d
    Q8_0  32 weights in 34 bytes: fp16 d, then 32 int8 q; value = q * d
    Q4_K  256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit sub-block scales
          and eight 6-bit mins, then 128 bytes of nibbles (per 64 weights: 32 bytes, element l
          in the low nibble, element l+32 in the high); value = (d*sc) * q - (dmin*m)

Q6_K (six bits in super-blocks of 256, what llama.cpp's Q4_K_M uses for some tensors) is read
only. Dequantization is computed in fp32 in the same order of operations as ggml's reference
(`dequantize_row_*`) and the gguf package's numpy twin, so all three give the same bits.

scoutq's own symmetric int4 with signed scales (a step of max/-8) and fp16 scales is Q4_0's
grid, and int8 with q in [-127, 127] is Q8_0's; `q4_0_blocks` and `q8_0_blocks` therefore pack
a calibrated result losslessly. Q4_K has its own search here (`quantize_q4_k`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoutq.quant import primitives
from scoutq.quant.packed import PackedWeight
from scoutq.quant.scheme import Scheme

QK = 32  # weights per Q4_0 / Q8_0 block
QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class BlockType:
    name: str  # scoutq's and llama.cpp's lower-case name: q4_0, q8_0, q4_k
    block: int  # weights per block
    nbytes: int  # bytes per block

    def row_bytes(self, columns: int) -> int:
        return columns // self.block * self.nbytes


# A GGUF recipe names ggml block types; each fixes bits, groups and fp16 scales.
GGML_SCHEMES: dict[str, Scheme] = {
    "q4_0": Scheme(4, QK, True, "float16", "q4_0"),
    "q8_0": Scheme(8, QK, True, "float16", "q8_0"),
    "q4_k": Scheme(4, QK, False, "float16", "q4_k"),  # 6-bit sub-block steps and offsets in 256-blocks
}

Q4_0 = BlockType("q4_0", QK, 18)
Q8_0 = BlockType("q8_0", QK, 34)
Q4_K = BlockType("q4_k", QK_K, 144)
BLOCK_TYPES = {t.name: t for t in (Q4_0, Q8_0, Q4_K)}


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """fp16 values [..., n] as their little-endian bytes [..., n, 2]."""
    return d.to(torch.float16).contiguous().view(torch.uint8).view(*d.shape, 2)


def _fp16_from(raw: torch.Tensor) -> torch.Tensor:
    """Two bytes [..., 2] as the fp16 they encode, widened to fp32 [...]."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


# -- Q4_0 -------------------------------------------------------------------------------------

def q4_0_blocks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Pack int4 values q [rows, n] in [-8, 7] with one fp16 step d [rows, n/32] per 32 as Q4_0
    rows [rows, n/32 * 18] (uint8)."""
    rows, n = q.shape
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8).view(rows, n // QK, 2, QK // 2)
    packed = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)
    return torch.cat([_fp16_bytes(d), packed], dim=-1).view(rows, -1)


def unpack_q4_0(blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows [rows, n/32 * 18] -> (q int8 [rows, n] in [-8, 7], d fp32 [rows, n/32])."""
    rows = blocks.shape[0]
    raw = blocks.view(rows, n // QK, Q4_0.nbytes)
    nibbles = torch.stack([raw[..., 2:] & 0x0F, raw[..., 2:] >> 4], dim=2)
    return nibbles.view(rows, n).to(torch.int8) - 8, _fp16_from(raw[..., :2])


def dequantize_q4_0(blocks: torch.Tensor, n: int) -> torch.Tensor:
    q, d = unpack_q4_0(blocks, n)
    return (d.unsqueeze(-1) * q.view(q.shape[0], -1, QK).float()).view(q.shape[0], n)


# -- Q8_0 -------------------------------------------------------------------------------------

def q8_0_blocks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Pack int8 values q [rows, n] in [-127, 127] with fp16 steps d [rows, n/32] as Q8_0 rows.
    -128 is refused: ggml's x86 dot products take |q| with a sign instruction that overflows on it."""
    if q.numel() and int(q.min()) < -127:
        raise ValueError("Q8_0 values must lie in [-127, 127]")
    rows, n = q.shape
    values = q.to(torch.int8).contiguous().view(torch.uint8).view(rows, n // QK, QK)
    return torch.cat([_fp16_bytes(d), values], dim=-1).view(rows, -1)


def unpack_q8_0(blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = blocks.shape[0]
    raw = blocks.view(rows, n // QK, Q8_0.nbytes)
    return raw[..., 2:].contiguous().view(torch.int8).reshape(rows, n), _fp16_from(raw[..., :2])


def dequantize_q8_0(blocks: torch.Tensor, n: int) -> torch.Tensor:
    q, d = unpack_q8_0(blocks, n)
    return (q.view(q.shape[0], -1, QK).float() * d.unsqueeze(-1)).view(q.shape[0], n)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest Q8_0 (ggml's convention: d = absmax / 127, q in [-127, 127]); the codes
    are rounded against the stored fp16 step, so q * d is what a reader reconstructs."""
    rows, n = w.shape
    grouped = w.float().view(rows, n // QK, QK)
    d = (grouped.abs().amax(dim=-1) / 127).to(torch.float16)
    step = d.float().unsqueeze(-1)
    q = torch.where(step > 0, torch.round(grouped / torch.where(step > 0, step, 1)), 0).clamp(-127, 127)
    return q8_0_blocks(q.view(rows, n).to(torch.int8), d)


# -- Q4_K -------------------------------------------------------------------------------------

SUB = 32  # weights per Q4_K sub-block
SUBS = QK_K // SUB  # sub-blocks per super-block
REFINE_STEPS = 4  # least-squares refinements of each sub-block's step and offset


def q4_k_blocks(q: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                ) -> torch.Tensor:
    """Pack Q4_K: q [rows, n] in [0, 15]; d, dmin fp16 [rows, n/256]; scales, mins [rows, n/256, 8]
    in [0, 63] -> rows [rows, n/256 * 144] (uint8)."""
    rows, n = q.shape
    supers = n // QK_K
    sc, m = scales.to(torch.uint8), mins.to(torch.uint8)
    low, high = sc[..., :4], sc[..., 4:]
    mlow, mhigh = m[..., :4], m[..., 4:]
    packed_scales = torch.cat([
        low | ((high >> 4) << 6),  # bytes 0-3: scales 0-3, and bits 4-5 of scales 4-7
        mlow | ((mhigh >> 4) << 6),  # bytes 4-7: mins 0-3, and bits 4-5 of mins 4-7
        (high & 0x0F) | ((mhigh & 0x0F) << 4),  # bytes 8-11: the low 4 bits of scales and mins 4-7
    ], dim=-1)
    codes = q.to(torch.uint8).view(rows, supers, QK_K // 64, 2, 32)
    nibbles = (codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)).view(rows, supers, QK_K // 2)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), packed_scales, nibbles], dim=-1).view(rows, -1)


def unpack_q4_k(blocks: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows -> (q uint8 [rows, n], d fp32, dmin fp32 [rows, n/256], scales, mins [rows, n/256, 8])."""
    rows = blocks.shape[0]
    supers = n // QK_K
    raw = blocks.view(rows, supers, Q4_K.nbytes)
    d, dmin = _fp16_from(raw[..., 0:2]), _fp16_from(raw[..., 2:4])
    packed = raw[..., 4:16]
    first, second, third = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([first & 0x3F, (third & 0x0F) | ((first >> 2) & 0x30)], dim=-1)
    mins = torch.cat([second & 0x3F, (third >> 4) | ((second >> 2) & 0x30)], dim=-1)
    nibbles = raw[..., 16:].view(rows, supers, QK_K // 64, 1, 32)
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=3).reshape(rows, n)
    return q, d, dmin, scales, mins


def dequantize_q4_k(blocks: torch.Tensor, n: int) -> torch.Tensor:
    q, d, dmin, scales, mins = unpack_q4_k(blocks, n)
    rows = q.shape[0]
    step = (d.unsqueeze(-1) * scales.float()).unsqueeze(-1)  # [rows, supers, 8, 1]
    offset = (dmin.unsqueeze(-1) * mins.float()).unsqueeze(-1)
    return (step * q.view(rows, -1, SUBS, SUB).float() - offset).view(rows, n)


def _fit_sub_blocks(x: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step s > 0 and offset m >= 0 of each sub-block (value = s*q - m, q in 0..15) minimising the
    importance-weighted squared error: start from the range, then alternate rounding with the
    weighted least-squares solution for (s, m), keeping the best pair seen."""
    low = x.amin(dim=-1).clamp(max=0)
    high = x.amax(dim=-1)
    step = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    offset = -low
    best_step, best_offset = step, offset
    best_error = torch.full_like(step, float("inf"))
    for _ in range(REFINE_STEPS + 1):
        q = torch.round((x + offset.unsqueeze(-1)) / step.unsqueeze(-1)).clamp(0, 15)
        error = (importance * (step.unsqueeze(-1) * q - offset.unsqueeze(-1) - x) ** 2).sum(dim=-1)
        better = error < best_error
        best_step, best_offset = torch.where(better, step, best_step), torch.where(better, offset, best_offset)
        best_error = torch.where(better, error, best_error)
        a, b, c = (importance * q * q).sum(-1), (importance * q).sum(-1), importance.sum(-1)
        dx, ex = (importance * q * x).sum(-1), (importance * x).sum(-1)
        det = a * c - b * b
        solved = det > 0
        new_step = (dx * c - b * ex) / torch.where(solved, det, 1)
        new_offset = (new_step * b - ex) / c.clamp_min(torch.finfo(torch.float32).tiny)
        # An offset below zero is outside the format (mins are unsigned): fit the step alone.
        no_offset = new_offset < 0
        new_step = torch.where(no_offset, dx / a.clamp_min(torch.finfo(torch.float32).tiny), new_step)
        new_offset = torch.where(no_offset, 0, new_offset)
        usable = solved & (new_step > 0)
        step, offset = torch.where(usable, new_step, step), torch.where(usable, new_offset, offset)
    return best_step, best_offset


Q4_K_CHUNK = 1 << 19  # weights fitted at once (2 MB per fp32 temporary): 6x faster than whole row blocks


def quantize_q4_k(w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_K rows for a weight [rows, n] (n a multiple of 256). importance [n] weights each input
    column's squared error (a Hessian diagonal from calibration); None weighs all alike.

    Each 32-weight sub-block gets a fitted step and offset; those are stored as 6-bit multiples
    of one fp16 d and dmin per super-block, and the codes are rounded against the stored grid,
    so dequantization reproduces exactly what was chosen. Rows are independent, so they are
    fitted a few at a time (the same bytes as all at once)."""
    rows, n = w.shape
    step = max(1, Q4_K_CHUNK // n)
    return torch.cat([_quantize_q4_k_rows(w[start : start + step], importance) for start in range(0, rows, step)])


def _quantize_q4_k_rows(w: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    rows, n = w.shape
    x = w.float().view(rows, n // QK_K, SUBS, SUB)
    weights = torch.ones_like(x) if importance is None else importance.float().view(1, n // QK_K, SUBS, SUB).expand_as(x)
    step, offset = _fit_sub_blocks(x, weights)
    d = (step.amax(dim=-1) / 63).to(torch.float16)
    dmin = (offset.amax(dim=-1) / 63).to(torch.float16)
    d32, dmin32 = d.float().unsqueeze(-1), dmin.float().unsqueeze(-1)
    scales = torch.where(d32 > 0, torch.round(step / torch.where(d32 > 0, d32, 1)), 0).clamp(0, 63)
    mins = torch.where(dmin32 > 0, torch.round(offset / torch.where(dmin32 > 0, dmin32, 1)), 0).clamp(0, 63)
    grid_step = (d32 * scales).unsqueeze(-1)  # the stored grid, in dequantize_q4_k's arithmetic
    grid_offset = (dmin32 * mins).unsqueeze(-1)
    q = torch.where(grid_step > 0, torch.round((x + grid_offset) / torch.where(grid_step > 0, grid_step, 1)), 0)
    return q4_k_blocks(q.clamp(0, 15).view(rows, n), d, dmin, scales, mins)


# -- Q6_K (read only: llama.cpp's Q4_K_M files carry it for some tensors) ---------------------

Q6_K = BlockType("q6_k", QK_K, 210)


def dequantize_q6_k(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """Q6_K rows -> fp32. A 210-byte block: 128 bytes of low nibbles, 64 bytes of 2-bit highs,
    sixteen int8 scales (one per 16 weights) and fp16 d; value = (d * scale) * (q - 32). Per 128
    weights, ql byte b holds weights b (low nibble) and b + 64 (high), and qh byte l holds the
    high bits of weights l, l + 32, l + 64 and l + 96."""
    rows = blocks.shape[0]
    supers = n // QK_K
    raw = blocks.view(rows, supers, Q6_K.nbytes)
    ql = raw[..., :128].reshape(rows, supers, 2, 1, 64)
    qh = raw[..., 128:192].reshape(rows, supers, 2, 1, 32)
    scales = raw[..., 192:208].contiguous().view(torch.int8).float()
    d = _fp16_from(raw[..., 208:210])
    low = torch.cat([ql & 0x0F, ql >> 4], dim=3).reshape(rows, supers, 8, 32)
    high = torch.cat([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=3).reshape(rows, supers, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(rows, supers, 16, 16).float()
    return ((d.unsqueeze(-1) * scales).unsqueeze(-1) * q).reshape(rows, n)


# -- any type ---------------------------------------------------------------------------------

DEQUANTIZE = {"q4_0": dequantize_q4_0, "q8_0": dequantize_q8_0, "q4_k": dequantize_q4_k, "q6_k": dequantize_q6_k}


def dequantize(blocks: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    """Rows of `kind` blocks [rows, bytes] as fp32 [rows, n]."""
    return DEQUANTIZE[kind](blocks, n)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest Q4_0 in ggml's convention: each block's largest-magnitude value lands on
    -8 (a signed step of max / -8, primitives.signed_scale), codes rounded against the fp16 step."""
    scheme = GGML_SCHEMES["q4_0"]
    scale, _ = primitives.compute_qparams(w, scheme, torch.float16, signed=True)
    return q4_0_blocks(primitives.quantize(w, scale, None, scheme), scale)


def packed_blocks(packed: PackedWeight) -> torch.Tensor:
    """A symmetric int4 or int8 result with fp16 scales in groups of 32 (a calibrated Q4_0 or
    Q8_0 module) as ggml rows, losslessly."""
    scheme = packed.scheme
    if not (scheme.symmetric and scheme.group_size == QK and packed.scale.dtype == torch.float16):
        raise ValueError(f"{scheme.describe()} with {packed.scale.dtype} scales is not a ggml Q4_0/Q8_0 grid")
    q = packed.unpacked()
    return q4_0_blocks(q, packed.scale) if scheme.bits == 4 else q8_0_blocks(q, packed.scale)
