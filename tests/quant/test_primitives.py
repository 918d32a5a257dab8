"""The fast quantization primitives, held bit for bit to two independent definitions.

* `scoutq/quant/reference.py`: slow loops, one value and one bit field at a time, written
  from the format's definition (quantized-formats.md B1).
* compressed-tensors' own `pack_to_int32` / `unpack_from_int32`: the code that its
  decompressor (and so transformers) uses to read scoutq's output.

`rtn_quantize` (both layouts, in blocks) is held to the same reference, and `PackedWeight`
must survive its own state round trip. Every comparison is `torch.equal`: a one-step
difference in a single packed value is a different checkpoint. Shapes stay small because
the reference is a Python loop.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from scoutq.errors import ScoutqError
from scoutq.quant import primitives, reference, rtn
from scoutq.quant.packed import SUFFIXES, PackedWeight, packed_shapes
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@dataclass(frozen=True)
class Case:
    """A scheme and a weight shape it applies to."""

    scheme: Scheme
    shape: tuple[int, int]

    @property
    def id(self) -> str:
        return f"{self.scheme.describe()}-{self.shape[0]}x{self.shape[1]}"


CASES = [
    Case(Scheme(8, None, True), (6, 40)),
    Case(Scheme(8, None, True), (5, 37)),  # per channel: any column count
    Case(Scheme(8, None, False), (7, 24)),
    Case(Scheme(8, None, False), (3, 13)),
    Case(Scheme(4, 32, True), (5, 96)),
    Case(Scheme(4, 32, False), (9, 64)),  # odd row count: zero points fill a partial word
    Case(Scheme(4, 64, True), (4, 192)),
    Case(Scheme(4, 64, False), (3, 128)),
    Case(Scheme(4, 128, True), (4, 256)),
    Case(Scheme(4, 128, False), (13, 128)),
    Case(Scheme(4, None, True), (3, 40)),  # int4 per channel
    Case(Scheme(4, None, False), (5, 24)),
]


def random_weight(
    shape: tuple[int, int], dtype: torch.dtype, seed: int, zero_rows: tuple[int, ...] = ()
) -> torch.Tensor:
    """N(0, 0.02) weights with a few outliers and skewed rows, so groups differ in range and sign."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * 0.02
    w[:, ::7] *= 4  # a few larger values per row
    if shape[0] > 2:
        w[1] = w[1].abs()  # all-positive row: asymmetric low clamps to 0
        w[2] = -w[2].abs() - 0.001  # all-negative row: high clamps to 0
    for row in zero_rows:
        w[row] = 0
    return w.to(dtype)


def random_q(shape: tuple[int, int], bits: int, seed: int) -> torch.Tensor:
    """Signed int8 values covering the whole range of `bits`, extremes included."""
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(low, high + 1, shape, generator=generator, dtype=torch.int8)
    q.view(-1)[:2] = torch.tensor([low, high], dtype=torch.int8)[: q.numel()]
    return q


# -- qparams and quantize against the reference ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_qparams_and_quantize_match_reference(case: Case, dtype: torch.dtype) -> None:
    w = random_weight(case.shape, dtype, seed=zlib.crc32(case.id.encode()) % 1000, zero_rows=(0,))
    scale, zero = primitives.compute_qparams(w, case.scheme, dtype)
    ref_scale, ref_zero = reference.qparams(w, case.scheme, dtype)

    assert scale.dtype == dtype and scale.shape == (case.shape[0], case.scheme.groups(case.shape[1]))
    assert torch.equal(scale, ref_scale)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    if case.scheme.symmetric:
        assert zero is None and ref_zero is None
    else:
        assert zero is not None and ref_zero is not None and zero.dtype == torch.int8
        assert torch.equal(zero, ref_zero)

    q = primitives.quantize(w, scale, zero, case.scheme)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert torch.equal(q, reference.quantize(w, ref_scale, ref_zero, case.scheme))
    assert int(q.min()) >= case.scheme.qmin and int(q.max()) <= case.scheme.qmax


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.scheme.symmetric], ids=lambda c: c.id)
def test_signed_scales_match_reference_and_put_the_extreme_on_qmin(case: Case, dtype: torch.dtype) -> None:
    w = random_weight(case.shape, dtype, seed=zlib.crc32(case.id.encode()) % 997, zero_rows=(0,))
    w[1, 0] = 0.5  # a positive extreme in row 1's first group: its scale must be negative
    scale, zero = primitives.compute_qparams(w, case.scheme, dtype, signed=True)
    ref_scale, ref_zero = reference.qparams(w, case.scheme, dtype, signed=True)
    assert zero is None and ref_zero is None
    assert torch.equal(scale, ref_scale) and bool(torch.isfinite(scale).all()) and bool((scale != 0).all())
    assert float(scale[1, 0]) < 0
    q = primitives.quantize(w, scale, None, case.scheme)
    assert torch.equal(q, reference.quantize(w, ref_scale, None, case.scheme))
    # The group's largest-magnitude value is stored as qmin and comes back exactly.
    size = case.scheme.group_size or case.shape[1]
    group = w[1, :size].float()
    at = int(group.abs().argmax())
    assert int(q[1, at]) == case.scheme.qmin
    assert float(primitives.dequantize(q, scale, None, case.scheme)[1, at]) == float(group[at])
    # The range form (primitives.qparams_from_range, used by the clipping search) is the same arithmetic.
    grouped = w.float().reshape(case.shape[0], -1, size)
    ranged, _ = primitives.qparams_from_range(grouped.amin(-1), grouped.amax(-1), case.scheme, dtype, signed=True)
    assert torch.equal(ranged, scale)


def test_signed_scales_tie_and_zero_groups_keep_a_positive_scale() -> None:
    scheme = Scheme(4, 8, True)
    w = torch.tensor([[0.5, -0.5, 0.1, 0, 0, 0, 0, 0.2], [0.0] * 8], dtype=torch.bfloat16)
    scale, _ = primitives.compute_qparams(w, scheme, torch.bfloat16, signed=True)
    ref_scale, _ = reference.qparams(w, scheme, torch.bfloat16, signed=True)
    assert torch.equal(scale, ref_scale)
    assert float(scale[0, 0]) == 0.5 / 8  # -0.5 goes to -8, +0.5 is clipped to 7 steps
    assert float(scale[1, 0]) > 0
    assert torch.equal(primitives.dequantize(primitives.quantize(w, scale, None, scheme), scale, None, scheme)[1], w[1])


def test_signed_scales_round_finer_than_the_symmetric_range() -> None:
    # absmax / 8 instead of / 7.5, and no clipping of a positive extreme: lower error overall.
    scheme = Scheme(4, 128, True)
    w = random_weight((64, 1024), torch.float32, seed=3)

    def squared_error(signed: bool) -> float:
        scale, _ = primitives.compute_qparams(w, scheme, torch.bfloat16, signed=signed)
        q = primitives.quantize(w, scale, None, scheme)
        return float((primitives.dequantize(q, scale, None, scheme).float() - w).square().sum())

    assert squared_error(True) < 0.92 * squared_error(False)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_all_zero_weight_gets_usable_scale_and_dequantizes_to_zero(symmetric: bool) -> None:
    scheme = Scheme(4, 32, symmetric)
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    scale, zero = primitives.compute_qparams(w, scheme, torch.bfloat16)
    ref_scale, ref_zero = reference.qparams(w, scheme, torch.bfloat16)
    assert torch.equal(scale, ref_scale) and bool((scale > 0).all())
    assert (zero is None) == (ref_zero is None) and (zero is None or torch.equal(zero, ref_zero))
    q = primitives.quantize(w, scale, zero, scheme)
    assert torch.equal(q, reference.quantize(w, scale, zero, scheme))
    assert torch.equal(primitives.dequantize(q, scale, zero, scheme), w)


def fits_words(case: Case) -> bool:
    """rtn_quantize takes whole int32 words per row (every real weight does); odd shapes do not."""
    return case.shape[1] % (32 // case.scheme.bits) == 0


@pytest.mark.parametrize("case", [c for c in CASES if fits_words(c)], ids=lambda c: c.id)
def test_rtn_matches_reference_across_blocks(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """rtn_quantize (rows) and rtn_quantize_input_major (the stored [in, out] expert layout)
    work in blocks; neither the layout nor the block size may show in the output."""
    w = random_weight(case.shape, torch.bfloat16, seed=5, zero_rows=(0,))
    ref_scale, ref_zero = reference.qparams(w, case.scheme, torch.bfloat16)
    ref_q = reference.quantize(w, ref_scale, ref_zero, case.scheme)
    monkeypatch.setattr(rtn, "BLOCK_ELEMENTS", 2 * case.shape[1])  # a few rows / groups per block
    for packed in (rtn_quantize(w, case.scheme), rtn.rtn_quantize_input_major(w.t(), case.scheme)):
        assert packed.shape == case.shape
        assert torch.equal(packed.scale, ref_scale)
        assert (packed.zero_point is None) == (ref_zero is None)
        assert packed.zero_point is None or torch.equal(packed.zero_point, ref_zero)
        assert torch.equal(packed.packed, reference.pack(ref_q, case.scheme.bits))


def test_rtn_refuses_nan_and_inf() -> None:
    w = random_weight((4, 64), torch.bfloat16, seed=1)
    for bad in (float("nan"), float("inf")):
        poisoned = w.clone()
        poisoned[2, 17] = bad
        with pytest.raises(ScoutqError, match="NaN or Inf"):
            rtn_quantize(poisoned, Scheme(4, 32))
        with pytest.raises(ScoutqError, match="NaN or Inf"):
            rtn.rtn_quantize_input_major(poisoned.t(), Scheme(8, None))


# -- packing against the reference and compressed-tensors --------------------------------------

PACK_SHAPES = [(1, 1), (3, 7), (4, 8), (2, 9), (5, 13), (3, 33), (6, 64), (1, 5), (7, 250)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", PACK_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack_match_reference_and_compressed_tensors(shape: tuple[int, int], bits: int) -> None:
    q = random_q(shape, bits, seed=shape[0] * 100 + shape[1])
    packed = primitives.pack_int32(q, bits)

    words = -(-shape[1] * bits // 32)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], words)
    assert torch.equal(packed, reference.pack(q, bits))
    assert torch.equal(packed, pack_to_int32(q, bits))

    assert torch.equal(primitives.unpack_int32(packed, bits, shape[1]), q)
    assert torch.equal(reference.unpack(packed, bits, shape[1]), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), q)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (13, 2), (32, 3), (33, 1), (128, 2), (7, 5)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_zero_points_pack_along_dim0_like_compressed_tensors(shape: tuple[int, int], bits: int) -> None:
    """Zero points [out, groups] are packed along the output dim: int32 [ceil(out*bits/32), groups]."""
    zero = random_q(shape, bits, seed=shape[0] + 7 * shape[1])
    packed = primitives.pack_zero_point(zero, bits)

    assert packed.dtype == torch.int32 and packed.shape == (-(-shape[0] * bits // 32), shape[1])
    assert torch.equal(packed, pack_to_int32(zero, bits, packed_dim=0))
    assert torch.equal(packed, reference.pack(zero.t(), bits).t())
    assert torch.equal(primitives.unpack_zero_point(packed, bits, shape[0]), zero)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=0), zero)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_accepts_non_contiguous_input(bits: int) -> None:
    """Expert weights are transposed views of the stored [in, out] slice."""
    q = random_q((24, 10), bits, seed=3)
    view = q.t()
    assert not view.is_contiguous()
    assert torch.equal(primitives.pack_int32(view, bits), reference.pack(view.contiguous(), bits))


def test_pack_rejects_unsupported_bits() -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        primitives.pack_int32(torch.zeros(2, 8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        Scheme(3, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        Scheme(4, 100)


# -- PackedWeight ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_packed_weight_state_round_trip(case: Case) -> None:
    w = random_weight(case.shape, torch.bfloat16, seed=11)
    scale, zero = primitives.compute_qparams(w, case.scheme, torch.bfloat16)
    packed = PackedWeight.from_quantized(primitives.quantize(w, scale, zero, case.scheme), scale, zero, case.scheme)
    state = packed.state()

    expected_suffixes = [s for s in SUFFIXES if case.scheme.symmetric is False or s != "weight_zero_point"]
    assert list(state) == expected_suffixes
    for suffix, (shape, dtype) in packed_shapes(*case.shape, case.scheme).items():
        assert tuple(state[suffix].shape) == shape, suffix
        expected_dtype = {"I32": torch.int32, "I64": torch.int64, "SRC": torch.bfloat16}[dtype]
        assert state[suffix].dtype == expected_dtype, suffix
    assert state["weight_shape"].tolist() == list(case.shape)

    restored = PackedWeight.from_state(state, case.scheme)
    assert restored.shape == case.shape
    assert torch.equal(restored.packed, packed.packed) and torch.equal(restored.scale, packed.scale)
    if case.scheme.symmetric:
        assert restored.zero_point is None
    else:
        assert restored.zero_point is not None and packed.zero_point is not None
        assert torch.equal(restored.zero_point, packed.zero_point)
    assert torch.equal(restored.unpacked(), packed.unpacked())
    assert torch.equal(restored.dequantize(), packed.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(restored.state().values(), state.values()))


# -- dequantization error sanity ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "bound"),
    [
        (Scheme(8, None, True), 0.01),
        (Scheme(8, None, False), 0.01),
        (Scheme(4, 128, True), 0.12),
        (Scheme(4, 128, False), 0.12),
        (Scheme(4, 32, True), 0.10),
    ],
    ids=lambda v: v.describe() if isinstance(v, Scheme) else str(v),
)
def test_dequantize_error_is_small(scheme: Scheme, bound: float) -> None:
    """Relative Frobenius error of round-to-nearest on N(0, 0.02) weights."""
    generator = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=generator) * 0.02).to(torch.bfloat16)
    dense = rtn_quantize(w, scheme).dequantize()
    assert dense.dtype == torch.bfloat16 and dense.shape == w.shape
    error = float((dense.float() - w.float()).norm() / w.float().norm())
    assert 0 < error < bound, f"{scheme.describe()}: relative error {error:.4f}"


def test_quantize_inverts_dequantize_on_grid_values() -> None:
    """Weights exactly on the grid ((q - zero) * a power-of-two scale) quantize back to q."""
    scheme = Scheme(4, 32, False)
    q = random_q((4, 64), 4, seed=9)
    scale = torch.full((4, 2), 0.0625, dtype=torch.bfloat16)
    zero = torch.tensor([[0, 1], [-2, 3], [7, -8], [0, 0]], dtype=torch.int8)
    w = primitives.dequantize(q, scale, zero, scheme)
    assert torch.equal(primitives.quantize(w, scale, zero, scheme), q)
    assert torch.equal(reference.quantize(w, scale, zero, scheme), q)
