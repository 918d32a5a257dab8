"""Slow, obvious twins of quant/ggml.py: one block at a time, byte by byte, as ggml-common.h
lays the blocks out. Tests hold the vectorised versions to these bit for bit."""

from __future__ import annotations

import struct

import numpy as np


def _half(value: float) -> bytes:
    return struct.pack("<e", value)


def q4_0_block(q: list[int], d: float) -> bytes:
    """32 values in [-8, 7] and their fp16 step: d, then byte j = (q[j]+8) | (q[j+16]+8) << 4."""
    return _half(d) + bytes((q[j] + 8) | ((q[j + 16] + 8) << 4) for j in range(16))


def q8_0_block(q: list[int], d: float) -> bytes:
    return _half(d) + struct.pack("<32b", *q)


def q4_k_block(q: list[int], d: float, dmin: float, scales: list[int], mins: list[int]) -> bytes:
    """256 codes in [0, 15], fp16 d and dmin, eight 6-bit scales and mins."""
    packed = bytearray(12)
    for j in range(4):
        packed[j] = scales[j] | ((scales[j + 4] >> 4) << 6)
        packed[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6)
        packed[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4)
    nibbles = bytearray()
    for chunk in range(4):  # 64 values: element l low, element l + 32 high
        base = chunk * 64
        nibbles += bytes(q[base + l] | (q[base + 32 + l] << 4) for l in range(32))
    return _half(d) + _half(dmin) + bytes(packed) + bytes(nibbles)


def dequantize_q4_k_block(block: bytes) -> list[np.float32]:
    """ggml's dequantize_row_q4_K for one block, element by element in fp32."""
    d = np.float32(struct.unpack("<e", block[0:2])[0])
    dmin = np.float32(struct.unpack("<e", block[2:4])[0])
    packed, nibbles = block[4:16], block[16:]
    out: list[np.float32] = []
    for sub in range(8):
        if sub < 4:
            scale, low = packed[sub] & 63, packed[sub + 4] & 63
        else:
            scale = (packed[sub + 4] & 0x0F) | ((packed[sub - 4] >> 6) << 4)
            low = (packed[sub + 4] >> 4) | ((packed[sub] >> 6) << 4)
        step, offset = d * np.float32(scale), dmin * np.float32(low)
        chunk, high = divmod(sub, 2)
        for l in range(32):
            byte = nibbles[chunk * 32 + l]
            code = (byte >> 4) if high else (byte & 0x0F)
            out.append(step * np.float32(code) - offset)
    return out
