"""Every kernel backend against the reference (dequantize, then matmul), with stated tolerances.

Tolerances are on the maximum absolute error relative to the largest reference output:
  * cpu: PyTorch's packed kernels run in bf16 (activations and accumulation outputs), so
    they match to bf16 precision: 2e-2 (a bf16 ulp is 2^-8 = 3.9e-3 relative; sums add a few).
    From cpu.TILES_FROM_TOKENS tokens on, the cpu backend multiplies dequantized fp32 tiles
    instead (tiles.py), held to the same bound here and to 1e-6 against the exact fp32
    dequantization below. scoutq's native int4 op, scoutq::int4_matmul (bf16 activations, fp32
    accumulation), is held to the same 2e-2, for 1 to 64 tokens (every register-tile size and a ragged last tile)
    and groups of 64, 128, 256 and whole rows.
  * bnb: re-quantizes the weight in its own format (nf4 blocks of 64, LLM.int8), so it
    matches only to within that format's error: 2e-1 for 4-bit, 3e-2 for 8-bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from scoutq.kernels import Backend, cpu, native, prepare, tiles
from scoutq.kernels.cpu import (
    TILES_FROM_TOKENS,
    DenseMatmul,
    Int4CpuMatmul,
    Int8CpuMatmul,
    TokenDispatch,
    packed_matmul,
)
from scoutq.quant.packed import PackedWeight
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme

SCHEMES = [Scheme(8, None, True), Scheme(8, None, False), Scheme(4, 128, True), Scheme(4, 128, False),
           Scheme(4, 64, True), Scheme(4, 32, False)]
TOKENS = [1, 2, 4, 16, 64]
TOLERANCE = {Backend.CPU: {4: 2e-2, 8: 2e-2}, Backend.BNB: {4: 2e-1, 8: 3e-2}}


@pytest.fixture(autouse=True)
def kernels_for_small_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights here are small enough that the cpu backend would multiply them densely
    (cpu.DENSE_BELOW_BYTES); these tests are about the kernels."""
    monkeypatch.setattr(cpu, "DENSE_BELOW_BYTES", 0)


def test_small_weights_are_multiplied_densely(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    packed = rtn_quantize(weight(Scheme(4, 128)), Scheme(4, 128))
    kernel = prepare(packed, Backend.CPU)
    assert isinstance(kernel, DenseMatmul)
    x = torch.randn(5, packed.shape[1])
    assert torch.equal(kernel(x), prepare(packed, Backend.REFERENCE)(x))  # the oracle's own values


def weight(scheme: Scheme, out_features: int = 192, in_features: int = 512) -> torch.Tensor:
    generator = torch.Generator().manual_seed(scheme.bits * 1000 + (scheme.group_size or 0))
    return (torch.randn(out_features, in_features, generator=generator) * 0.02).to(torch.bfloat16)


@pytest.mark.parametrize("backend", [Backend.CPU, Backend.BNB])
@pytest.mark.parametrize("scheme", SCHEMES, ids=Scheme.describe)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_backend_matches_reference(backend: Backend, scheme: Scheme, tokens: int, dtype: torch.dtype) -> None:
    if backend == Backend.BNB:
        pytest.importorskip("bitsandbytes")
    packed = rtn_quantize(weight(scheme), scheme)
    reference = prepare(packed, Backend.REFERENCE)
    kernel = prepare(packed, backend)
    x = torch.randn(tokens, packed.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
    expected = reference(x.float()).float()
    got = kernel(x)
    assert got.dtype == dtype and got.shape == (tokens, packed.shape[0])
    error = (got.float() - expected).abs().max().item() / expected.abs().max().item()
    assert error <= TOLERANCE[backend][scheme.bits], f"{backend} {scheme.describe()}: relative error {error:.3g}"


def test_cpu_backend_uses_packed_kernels_where_it_can() -> None:
    int4 = Int4CpuMatmul if native.library() is None else native.NativeInt4Matmul
    # Groups of 32 are not runs of 64: PyTorch's kernel takes them.
    assert isinstance(packed_matmul(rtn_quantize(weight(Scheme(4, 32)), Scheme(4, 32))), Int4CpuMatmul)
    assert isinstance(packed_matmul(rtn_quantize(weight(Scheme(8, None)), Scheme(8, None))), Int8CpuMatmul)
    kernel = prepare(rtn_quantize(weight(Scheme(4, 128)), Scheme(4, 128)), Backend.CPU)
    if tiles.library() is None:
        assert isinstance(kernel, int4)
        return
    assert isinstance(kernel, TokenDispatch) and isinstance(kernel.few, int4)
    threshold = TILES_FROM_TOKENS[4]
    assert kernel.method(threshold - 1) == int4.__name__ and kernel.method(threshold) == "tiles"


@pytest.mark.parametrize("scheme", SCHEMES, ids=Scheme.describe)
@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
def test_tile_path_equals_the_exact_fp32_dequantization(scheme: Scheme, tokens: int) -> None:
    """Dequantized tiles feeding an fp32 GEMM: the same as multiplying the exactly dequantized
    weight ((q - z) * s in fp32) to fp32 summation order; tolerance 1e-6 of the largest output."""
    if tiles.library() is None:
        pytest.skip(f"tile kernel unavailable: {tiles.status()}")
    packed = rtn_quantize(weight(scheme, out_features=300), scheme)
    kernel = tiles.DequantTileMatmul(packed)
    kernel.tile_rows = 64  # several tiles and a ragged last one
    group = scheme.group_size or packed.shape[1]
    zero = 0.0 if packed.zero_point is None else packed.zero_point.float().repeat_interleave(group, 1)
    exact = (packed.unpacked().float() - zero) * packed.scale.float().repeat_interleave(group, 1)
    x = torch.randn(tokens, packed.shape[1], generator=torch.Generator().manual_seed(tokens))
    expected = x @ exact.t()
    error = (kernel(x) - expected).abs().max().item() / expected.abs().max().item()
    assert error <= 1e-6, f"{scheme.describe()}: relative error {error:.3g}"


def slow_native_pack(q: torch.Tensor) -> torch.Tensor:
    """int4_avx512.c's layout, one byte at a time: in each run of 64 inputs at k, byte j holds
    code k + j (plus 8) in its low nibble and code k + 32 + j (plus 8) in its high nibble."""
    out_features, in_features = q.shape
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    for row in range(out_features):
        for k in range(0, in_features, 64):
            for j in range(32):
                low, high = int(q[row, k + j]) + 8, int(q[row, k + 32 + j]) + 8
                packed[row, k // 2 + j] = low | (high << 4)
    return packed


def test_native_packing_matches_its_slow_twin() -> None:
    q = torch.randint(-8, 8, (5, 256), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(native.pack_int4(q), slow_native_pack(q))


def _skip_unless_native() -> None:
    """Skip where the CPU, toolchain or SCOUTQ_NATIVE rule the op out; a failed build on a capable
    machine is a failure, not a skip."""
    if native.library() is None and not native.status().startswith("could not build"):
        pytest.skip(f"native int4 op unavailable: {native.status()}")
    assert native.library() is not None, native.status()


def _loadable_op() -> Callable[..., torch.Tensor]:
    """The op, built even where the CPU lacks AVX-512 BF16 (its checks and fake run anywhere it
    loads); skipped where code compiled for AVX-512 should not be loaded or cannot be built."""
    if native.library() is not None:
        return native.library()
    if native._cpu_problem() not in (None, "this CPU lacks AVX-512 BF16") or not torch.cpu._is_avx512_supported():
        pytest.skip(f"the op cannot be loaded on this CPU: {native._cpu_problem()}")
    if native._toolchain_problem() is not None:
        pytest.skip(f"the op cannot be built here: {native._toolchain_problem()}")
    return native.build()


def _op_inputs(scheme: Scheme, tokens: int) -> tuple[PackedWeight, torch.Tensor]:
    packed = rtn_quantize(weight(scheme, 96, 512), scheme)
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens))
    return packed, x


@pytest.mark.parametrize("scheme", [Scheme(4, 128, True), Scheme(4, 128, False), Scheme(4, 64, True),
                                    Scheme(4, 64, False), Scheme(4, 256, False), Scheme(4, None, True)],
                         ids=Scheme.describe)
@pytest.mark.parametrize("tokens", [1, 3, 4, 8, 9, 16, 64])
def test_native_int4_kernel_matches_reference(scheme: Scheme, tokens: int) -> None:
    # Direct, whatever cpu_matmul would pick; every token tile size and a ragged last tile.
    _skip_unless_native()
    packed, x = _op_inputs(scheme, tokens)
    expected = prepare(packed, Backend.REFERENCE)(x)
    got = native.NativeInt4Matmul(packed)(x)
    assert got.dtype == x.dtype and got.shape == (tokens, 96)
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    assert error <= TOLERANCE[Backend.CPU][4], f"{scheme.describe()}: relative error {error:.3g}"
    # Leading dimensions are kept, as F.linear keeps them.
    assert native.NativeInt4Matmul(packed)(x.view(1, tokens, 512)).shape == (1, tokens, 96)


def test_native_op_is_a_torch_op() -> None:
    # Schema, fake (meta) implementation and dispatch as torch.compile would use them.
    _skip_unless_native()
    kernel = native.NativeInt4Matmul(rtn_quantize(weight(Scheme(4, 128, False), 96, 512), Scheme(4, 128, False)))
    x = torch.randn(4, 512).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.scoutq.int4_matmul, (x, kernel.packed, kernel.scales, kernel.zero_scales, 128))


def test_native_op_checks_its_arguments_and_has_a_fake() -> None:
    op = _loadable_op()
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    packed = torch.zeros(3, 64, dtype=torch.uint8)
    scales = torch.ones(3, 2)
    bad = {
        "x must be BFloat16, got Float": (x.float(), packed, scales, None, 64),
        "group_size must be a multiple of 64": (x, packed, scales, None, 32),
        "in_features must be a multiple of 64": (x[:, :100], packed, scales, None, 64),
        r"packed must have shape \[3, 64\]": (x, packed[:, :32], scales, None, 64),
        "scales must be contiguous": (x, packed, scales.t().contiguous().t(), None, 64),
        r"zero_scales must have shape \[3, 2\]": (x, packed, scales, scales[:, :1], 64),
    }
    for message, args in bad.items():
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    # The fake implementation gives the output's shape and dtype without running the kernel.
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), mode.from_tensor(packed), mode.from_tensor(scales), None, 64)
    assert fake.shape == (2, 3) and fake.dtype == torch.float32


def test_native_kernel_can_be_switched_off() -> None:
    probe = ("from scoutq.kernels import native, cpu; from scoutq.quant.rtn import rtn_quantize; "
             "from scoutq.quant.scheme import Scheme; import torch; "
             "w = rtn_quantize(torch.randn(64, 256).to(torch.bfloat16), Scheme(4, 128)); "
             "cpu.DENSE_BELOW_BYTES = 0; print(native.library() is None, type(cpu.cpu_matmul(w)).__name__, native.status())")
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "SCOUTQ_NATIVE": "0"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True Int4CpuMatmul disabled by SCOUTQ_NATIVE=0"


def test_reference_is_dequantize_then_matmul() -> None:
    scheme = Scheme(4, 128, False)
    packed = rtn_quantize(weight(scheme), scheme)
    x = torch.randn(3, packed.shape[1])
    assert torch.equal(prepare(packed, Backend.REFERENCE)(x), x @ packed.dequantize().float().t())
