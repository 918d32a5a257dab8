"""ggml block formats: scoutq's packing and dequantization against ggml's byte layout (the slow
twin in quant/ggml_reference.py) and against the gguf package's own dequantizer, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from scoutq.quant import ggml, ggml_reference, primitives
from scoutq.quant.ggml import GGML_SCHEMES
from scoutq.quant.packed import PackedWeight

GGUF_TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0,
              "q4_k": gguf.GGMLQuantizationType.Q4_K}


def weights(rows: int = 24, columns: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the awkward blocks real checkpoints have: all zero, one outlier,
    all positive, tiny magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator) * 0.02
    w[0, :256] = 0
    w[1, 5] = 0.9
    w[2, :256] = w[2, :256].abs() + 0.01
    w[3] *= 1e-4
    return w


@pytest.mark.parametrize("kind", ["q4_0", "q8_0", "q4_k"])
def test_dequantize_equals_the_gguf_package(kind: str) -> None:
    blocks = {"q4_0": ggml.quantize_q4_0, "q8_0": ggml.quantize_q8_0, "q4_k": ggml.quantize_q4_k}[kind](weights())
    ours = ggml.dequantize(blocks, kind, 512)
    theirs = gguf.quants.dequantize(blocks.numpy(), GGUF_TYPES[kind])
    assert np.array_equal(ours.numpy(), theirs)


def test_q4_0_and_q8_0_blocks_match_the_byte_by_byte_twin() -> None:
    generator = torch.Generator().manual_seed(1)
    q4 = torch.randint(-8, 8, (3, 64), generator=generator, dtype=torch.int8)
    q8 = torch.randint(-127, 128, (3, 64), generator=generator, dtype=torch.int8)
    d = (torch.rand(3, 2, generator=generator) * 0.01).to(torch.float16)
    fast4, fast8 = ggml.q4_0_blocks(q4, d), ggml.q8_0_blocks(q8, d)
    for row in range(3):
        slow4 = b"".join(ggml_reference.q4_0_block(q4[row, b * 32:(b + 1) * 32].tolist(), float(d[row, b]))
                         for b in range(2))
        slow8 = b"".join(ggml_reference.q8_0_block(q8[row, b * 32:(b + 1) * 32].tolist(), float(d[row, b]))
                         for b in range(2))
        assert fast4[row].numpy().tobytes() == slow4
        assert fast8[row].numpy().tobytes() == slow8
    # and back: the codes and steps come out as they went in
    codes, steps = ggml.unpack_q4_0(fast4, 64)
    assert torch.equal(codes, q4) and torch.equal(steps, d.float())


def test_q4_k_packing_and_dequantization_match_the_twin() -> None:
    generator = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (2, 256), generator=generator, dtype=torch.uint8)
    scales = torch.randint(0, 64, (2, 1, 8), generator=generator, dtype=torch.uint8)
    mins = torch.randint(0, 64, (2, 1, 8), generator=generator, dtype=torch.uint8)
    d = torch.tensor([[0.0031], [0.5]], dtype=torch.float16)
    dmin = torch.tensor([[0.0007], [0.02]], dtype=torch.float16)
    blocks = ggml.q4_k_blocks(q, d, dmin, scales, mins)
    for row in range(2):
        slow = ggml_reference.q4_k_block(q[row].tolist(), float(d[row, 0]), float(dmin[row, 0]),
                                         scales[row, 0].tolist(), mins[row, 0].tolist())
        assert blocks[row].numpy().tobytes() == slow
        values = np.array(ggml_reference.dequantize_q4_k_block(slow), dtype=np.float32)
        assert np.array_equal(ggml.dequantize_q4_k(blocks[row : row + 1], 256)[0].numpy(), values)
    unpacked = ggml.unpack_q4_k(blocks, 256)
    assert torch.equal(unpacked[0], q) and torch.equal(unpacked[3], scales) and torch.equal(unpacked[4], mins)


def test_q4_k_fit_beats_a_plain_range_grid() -> None:
    """The least-squares fit of each sub-block's step and offset lowers the error below rounding
    on each sub-block's min..max range (the starting point of the fit)."""
    w = weights(64, 1024, seed=3)
    fitted = ggml.dequantize_q4_k(ggml.quantize_q4_k(w), 1024)
    x = w.view(64, -1, 32)
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    step = ((high - low) / 15).clamp_min(1e-12)
    ranged = (torch.round((x - low) / step).clamp(0, 15) * step + low).view(64, 1024)
    assert ((fitted - w) ** 2).sum() < ((ranged - w) ** 2).sum()


def test_importance_moves_the_q4_k_error_onto_unimportant_columns() -> None:
    w = weights(32, 256, seed=4)
    importance = torch.ones(256)
    importance[:16] = 1000.0
    plain = ggml.dequantize_q4_k(ggml.quantize_q4_k(w), 256)
    weighted = ggml.dequantize_q4_k(ggml.quantize_q4_k(w, importance), 256)
    assert ((weighted - w)[:, :16] ** 2).sum() < ((plain - w)[:, :16] ** 2).sum()


def test_q4_0_rounding_is_ggml_convention() -> None:
    """Each block's largest-magnitude value lands exactly on -8 (a step of max / -8); the codes
    agree with the gguf package's own Q4_0 quantizer wherever the fp16 step does not tip a tie.
    Steps stay at least fp16's smallest normal number (6.1e-5), so a block whose whole range is
    below 8 times that (row 3 here) is rounded on that step instead."""
    w = weights()
    ours = ggml.quantize_q4_0(w)
    codes, _ = ggml.unpack_q4_0(ours, 512)
    blocks = w.view(24, -1, 32)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    nonzero = extreme.abs() / 8 >= torch.finfo(torch.float16).tiny
    picked = codes.view(24, -1, 32).gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((picked[nonzero] == -8).all())
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    normal_rows = [row for row in range(24) if row != 3]
    assert (theirs[normal_rows] == ours.numpy()[normal_rows]).mean() > 0.99


def test_a_calibrated_packed_weight_packs_losslessly() -> None:
    """A GPTQ-style result on Q4_0's grid (signed fp16 scales, groups of 32) becomes Q4_0 blocks
    whose dequantization is exactly the weight the calibration computed with."""
    w = weights()
    scheme = GGML_SCHEMES["q4_0"]
    scale, _ = primitives.compute_qparams(w, scheme, torch.float16, signed=True)
    packed = PackedWeight.from_quantized(primitives.quantize(w, scale, None, scheme), scale, None, scheme)
    blocks = ggml.packed_blocks(packed)
    assert torch.equal(ggml.dequantize_q4_0(blocks, 512), packed.reconstructed())
    int8 = GGML_SCHEMES["q8_0"]
    assert int8.qmin == -127  # Q8_0 leaves -128 out, so every int8 path (RTN, GPTQ, clip) stays packable
    scale8, _ = primitives.compute_qparams(w, int8, torch.float16, signed=True)
    q8 = primitives.quantize(w, scale8, None, int8)
    assert int(q8.min()) >= -127
    packed8 = PackedWeight.from_quantized(q8, scale8, None, int8)
    assert torch.equal(ggml.dequantize_q8_0(ggml.packed_blocks(packed8), 512), packed8.reconstructed())


def test_q8_0_refuses_minus_128() -> None:
    with pytest.raises(ValueError, match="-127, 127"):
        ggml.q8_0_blocks(torch.full((1, 32), -128, dtype=torch.int8), torch.ones(1, 1, dtype=torch.float16))


def test_q6_k_dequantization_equals_the_gguf_package() -> None:
    """Q6_K is read only (llama.cpp's Q4_K_M files carry it): any bytes with a finite fp16 d are a
    valid block."""
    generator = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (6, 2 * 210), generator=generator, dtype=torch.uint8)
    d = (torch.rand(6, 2, generator=generator) * 0.01).to(torch.float16).view(torch.uint8).view(6, 2, 2)
    blocks.view(6, 2, 210)[..., 208:210] = d
    theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q6_K)
    assert np.array_equal(ggml.dequantize_q6_k(blocks, 512).numpy(), theirs)
