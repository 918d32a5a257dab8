"""GPTQ and activation-aware clipping against their slow twins and against round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from scoutq.quant import primitives, reference
from scoutq.quant.clip import clip_quantize, search_qparams, weighted_error
from scoutq.quant.gptq import fp_target_weight, gptq_quantize, output_coupling, router_metric
from scoutq.quant.packed import PackedWeight
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme
from scoutq.quant.settings import ClipSettings, GptqSettings

SCHEMES = [Scheme(4, 32, True), Scheme(4, 32, False), Scheme(8, None, True), Scheme(8, 32, False)]


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels and a few loud ones, as real hidden states have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5 + torch.eye(features)
    loud = torch.ones(features)
    loud[torch.randperm(features, generator=generator)[: features // 16]] = 8.0
    return (torch.randn(tokens, features, generator=generator) @ mixing) * loud


def weight(out_features: int, in_features: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)


def output_error(w: torch.Tensor, packed: PackedWeight, x: torch.Tensor) -> float:
    """||X W^T - X Q^T||^2 / ||X W^T||^2: what GPTQ minimises."""
    reference_out = x @ w.float().t()
    return float((reference_out - x @ packed.dequantize().float().t()).square().sum() / reference_out.square().sum())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(scheme: Scheme) -> None:
    # H = c I: no column can compensate another, so GPTQ must round exactly as RTN does.
    w = weight(24, 64, 0)
    hessian = torch.eye(64) * 3.0
    expected = rtn_quantize(w, scheme)
    for act_order in (False, True):
        got = gptq_quantize(w, hessian, scheme, options=GptqSettings(damp=0.0, act_order=act_order))
        assert torch.equal(got.packed, expected.packed)
        assert torch.equal(got.scale, expected.scale)
        assert (got.zero_point is None) == (expected.zero_point is None)
        if got.zero_point is not None:
            assert torch.equal(got.zero_point, expected.zero_point)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True), Scheme(4, 32, False), Scheme(8, None, True)],
                         ids=lambda s: s.describe())
def test_gptq_matches_the_float64_schur_complement_twin(scheme: Scheme) -> None:
    # Blocked Cholesky updates in fp32 against the unblocked OBS formula in fp64: rounding
    # differs in the last bits, so a value near a rounding boundary may land on the other side.
    w = weight(16, 96, 1)
    x = correlated_inputs(512, 96, 2)
    hessian = x.t() @ x
    fast = gptq_quantize(w, hessian, scheme, options=GptqSettings(damp=0.01, block_size=32))
    slow = reference.gptq(w, hessian, scheme, torch.bfloat16, damp=0.01)
    agreement = float((fast.unpacked() == slow).float().mean())
    assert agreement >= 0.99, agreement


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True), Scheme(8, None, True)], ids=lambda s: s.describe())
def test_gptq_with_signed_scales_matches_its_twin(scheme: Scheme) -> None:
    w = weight(16, 96, 1)
    x = correlated_inputs(512, 96, 2)
    hessian = x.t() @ x
    fast = gptq_quantize(w, hessian, scheme, options=GptqSettings(damp=0.01, block_size=32, signed_scales=True))
    slow = reference.gptq(w, hessian, scheme, torch.bfloat16, damp=0.01, signed=True)
    assert bool((fast.scale < 0).any()) and bool((fast.scale > 0).any())
    assert float((fast.unpacked() == slow).float().mean()) >= 0.99
    # H = c I: nothing to compensate, so the codes are signed round-to-nearest's.
    plain = gptq_quantize(w, torch.eye(96), scheme, options=GptqSettings(damp=0.0, act_order=True, signed_scales=True))
    scale, _ = primitives.compute_qparams(w, scheme, torch.bfloat16, signed=True)
    assert torch.equal(plain.scale, scale)
    assert torch.equal(plain.unpacked(), primitives.quantize(w, scale, None, scheme))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("options", [GptqSettings(), GptqSettings(act_order=True), GptqSettings(mse_scales=True),
                                     GptqSettings(act_order=True, mse_scales=True, block_size=16)],
                         ids=["plain", "act_order", "mse", "act_order+mse"])
def test_gptq_output_error_is_well_below_rtn(scheme: Scheme, options: GptqSettings) -> None:
    w = weight(48, 128, 3)
    x = correlated_inputs(1024, 128, 4)
    rtn = output_error(w, rtn_quantize(w, scheme), x)
    gptq = output_error(w, gptq_quantize(w, x.t() @ x, scheme, options=options), x)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_gptq_output_is_a_plain_stored_weight() -> None:
    # act_order with static groups: the stored tensors are ordinary pack-quantized ones, and
    # they dequantize to what GPTQ's own updates assumed (checked through the output error).
    scheme = Scheme(4, 32, False)
    w = weight(32, 128, 5)
    x = correlated_inputs(256, 128, 6)
    packed = gptq_quantize(w, x.t() @ x, scheme, options=GptqSettings(act_order=True))
    again = PackedWeight.from_state(packed.state(), scheme)
    assert torch.equal(again.dequantize(), packed.dequantize())
    assert packed.packed.shape == (32, 16) and packed.scale.shape == (32, 4)
    assert packed.scale.dtype == torch.bfloat16


def test_gptq_handles_inputs_never_seen_and_too_few_tokens() -> None:
    # Rare experts: fewer tokens than features (H singular) and channels that are always zero.
    w = weight(16, 64, 7)
    x = correlated_inputs(8, 64, 8)
    x[:, :5] = 0
    packed = gptq_quantize(w, x.t() @ x, Scheme(4, 32, True))
    assert torch.isfinite(packed.dequantize().float()).all()


def test_gptq_refuses_nan_weights() -> None:
    from scoutq.errors import ScoutqError

    w = weight(8, 32, 9)
    w[3, 4] = float("nan")
    with pytest.raises(ScoutqError, match="expert 2.*NaN"):
        gptq_quantize(w, torch.eye(32), Scheme(4, 32, True), what="expert 2")


def drifted(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x as an upstream-quantized path sees it: the same tokens, a small correlated error."""
    generator = torch.Generator().manual_seed(seed)
    return x + 0.1 * x @ torch.randn(x.shape[1], x.shape[1], generator=generator) / x.shape[1] ** 0.5


def test_fp_target_weight_matches_the_least_squares_twin() -> None:
    w = weight(24, 64, 10).float()
    x_reference = correlated_inputs(400, 64, 11)
    x = drifted(x_reference, 12)
    for damp in (0.01, 0.1, 1.0):
        fast = fp_target_weight(w, x.t() @ x, x.t() @ x_reference, damp)
        slow = reference.fp_target_weight(w, x, x_reference, damp)
        torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-5)


def test_fp_target_weight_is_the_source_weight_without_drift() -> None:
    # Both streams equal: the source weight already reproduces the source output exactly.
    w = weight(24, 64, 13).float()
    x = correlated_inputs(400, 64, 14)
    hessian = x.t() @ x
    torch.testing.assert_close(fp_target_weight(w, hessian, hessian, 0.1), w, rtol=1e-3, atol=1e-5)
    # Heavy dampening pulls the target back to W whatever the drift.
    far = fp_target_weight(w, hessian, x.t() @ drifted(x, 15), 1e6)
    torch.testing.assert_close(far, w, rtol=1e-3, atol=1e-5)
    # No inputs at all: nothing to match.
    assert torch.equal(fp_target_weight(w, torch.zeros(64, 64), torch.zeros(64, 64), 0.1), w)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True), Scheme(8, None, True)], ids=lambda s: s.describe())
def test_fp_target_gptq_reproduces_the_source_output_better(scheme: Scheme) -> None:
    # What GPTAQ is for: on drifted inputs, GPTQ of the fp target matches the source model's
    # output (x_reference W^T) more closely than GPTQ of W does.
    w = weight(48, 128, 16)
    x_reference = correlated_inputs(1024, 128, 17)
    x = drifted(x_reference, 18)
    wanted = x_reference @ w.float().t()

    def error(packed: PackedWeight) -> float:
        return float((x @ packed.dequantize().float().t() - wanted).square().sum() / wanted.square().sum())

    hessian = x.t() @ x
    plain = gptq_quantize(w, hessian, scheme)
    target = fp_target_weight(w, hessian, x.t() @ x_reference, 0.01)
    aware = gptq_quantize(target, hessian, scheme, scale_dtype=torch.bfloat16)
    assert error(aware) < 0.6 * error(plain), (error(aware), error(plain))


def later_router_directions(rows: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, features, generator=generator)


def metric_error(w: torch.Tensor, packed: PackedWeight, hessian: torch.Tensor, metric: torch.Tensor) -> float:
    """tr(M E H E^T), E = W - Q: what router-aware GPTQ minimises."""
    e = w.double() - packed.dequantize().double()
    return float(torch.trace(metric.double() @ e @ hessian.double() @ e.t()))


def test_router_metric_is_the_identity_plus_the_normalised_router_subspace() -> None:
    directions = later_router_directions(6, 40, 20)
    metric = router_metric(directions, 10.0)
    torch.testing.assert_close(metric, metric.t())
    eigenvalues = torch.linalg.eigvalsh(metric.double())
    assert abs(float(eigenvalues.max()) - 11.0) < 1e-4  # 1 + weight along the loudest direction
    assert abs(float(eigenvalues.min()) - 1.0) < 1e-4  # untouched outside the 6 directions
    assert torch.equal(router_metric(directions, 0.0), torch.eye(40))
    assert torch.equal(router_metric(torch.zeros(0, 40), 10.0), torch.eye(40))


@pytest.mark.parametrize("scheme", [Scheme(4, 16, True), Scheme(4, 16, False), Scheme(8, None, True)],
                         ids=lambda s: s.describe())
def test_router_aware_gptq_matches_the_kronecker_twin(scheme: Scheme) -> None:
    # One row per block is the exact sequential solution, which the float64 twin states over
    # all weights at once (M kron H); fp32 against fp64 may flip a value on a rounding boundary.
    w = weight(8, 32, 21)
    x = correlated_inputs(256, 32, 22)
    hessian = x.t() @ x
    metric = router_metric(later_router_directions(3, 8, 23), 10.0)
    options = GptqSettings(damp=0.01, block_size=16, row_blocks=8)
    fast = gptq_quantize(w, hessian, scheme, options=options, coupling=output_coupling(metric))
    slow = reference.gptq_output_metric(w, hessian, metric, scheme, torch.bfloat16, damp=0.01)
    agreement = float((fast.unpacked() == slow).float().mean())
    assert agreement >= 0.98, agreement
    plain = reference.gptq(w, hessian, scheme, torch.bfloat16, damp=0.01)
    assert not torch.equal(slow, plain)  # the metric changed the rounding: the check above has teeth


@pytest.mark.parametrize("options", [GptqSettings(), GptqSettings(act_order=True, mse_scales=True, block_size=16)],
                         ids=["plain", "act_order+mse"])
def test_identity_metric_is_plain_gptq(options: GptqSettings) -> None:
    w = weight(24, 64, 24)
    x = correlated_inputs(512, 64, 25)
    scheme = Scheme(4, 32, True)
    plain = gptq_quantize(w, x.t() @ x, scheme, options=options)
    coupled = gptq_quantize(w, x.t() @ x, scheme, options=options, coupling=output_coupling(torch.eye(24)))
    assert torch.equal(coupled.packed, plain.packed) and torch.equal(coupled.scale, plain.scale)


@pytest.mark.parametrize("scheme", [Scheme(4, 32, True), Scheme(8, None, True)], ids=lambda s: s.describe())
@pytest.mark.parametrize("options", [GptqSettings(), GptqSettings(act_order=True, mse_scales=True)],
                         ids=["plain", "act_order+mse"])
def test_router_aware_gptq_lowers_the_error_along_router_directions(scheme: Scheme, options: GptqSettings) -> None:
    # Row blocks drop the coupling inside a block; what is left must still beat plain GPTQ on the
    # metric it targets, and cut the error that later routers read.
    w = weight(64, 128, 26)
    x = correlated_inputs(1024, 128, 27)
    hessian = x.t() @ x
    directions = later_router_directions(4, 64, 28)
    metric = router_metric(directions, 10.0)
    plain = gptq_quantize(w, hessian, scheme, options=options)
    aware = gptq_quantize(w, hessian, scheme, options=options, coupling=output_coupling(metric))
    # Measured at writing: metric error 0.78-0.87x, router noise 0.21-0.37x, plain output error
    # 1.05-1.09x of plain GPTQ's (the price: error moved out of the routers' directions).
    assert metric_error(w, aware, hessian, metric) < 0.9 * metric_error(w, plain, hessian, metric)

    def router_noise(packed: PackedWeight) -> float:
        return float((x @ (w.float() - packed.dequantize().float()).t() @ directions.t()).square().sum())

    assert router_noise(aware) < 0.5 * router_noise(plain)
    assert output_error(w, aware, x) < 1.15 * output_error(w, plain, x)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_clip_search_matches_its_slow_twin(scheme: Scheme, signed: bool) -> None:
    w = weight(12, 64, 10)
    importance = correlated_inputs(64, 64, 11).square().mean(0)
    options = ClipSettings(grid=8, min_ratio=0.6, signed_scales=signed)
    scale, zero = search_qparams(w, importance, scheme, torch.bfloat16, options)
    slow_scale, slow_zero = reference.clip_qparams(w, importance, scheme, torch.bfloat16, options.ratios(), signed)
    # Errors are summed in fp32 here and fp64 there: an exact tie may break differently, so
    # compare the chosen errors, and require identical choices almost everywhere.
    fast_error = weighted_error(w, scale, zero, importance, scheme)
    slow_error = weighted_error(w, slow_scale, slow_zero, importance, scheme)
    assert torch.all(fast_error <= slow_error * (1 + 1e-5) + 1e-12)
    assert float((scale == slow_scale).float().mean()) >= 0.95


def test_clip_with_one_ratio_is_round_to_nearest() -> None:
    # grid 1 tries the full range only: round-to-nearest's scales, in either sign convention.
    w = weight(8, 64, 14)
    importance = torch.ones(64)
    for signed in (False, True):
        scale, _ = search_qparams(w, importance, Scheme(4, 32, True), torch.bfloat16,
                                  ClipSettings(grid=1, signed_scales=signed))
        expected, _ = primitives.compute_qparams(w, Scheme(4, 32, True), torch.bfloat16, signed=signed)
        assert torch.equal(scale, expected)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_clip_is_never_worse_than_rtn_in_the_error_it_minimises(scheme: Scheme) -> None:
    # The ratio 1 reproduces RTN's scales exactly, so every group can only improve.
    w = weight(32, 128, 12)
    w[0, 3] = 0.4  # an outlier that stretches its group's range
    importance = correlated_inputs(128, 128, 13).square().mean(0)
    rtn_scale, rtn_zero = primitives.compute_qparams(w, scheme, torch.bfloat16)
    scale, zero = search_qparams(w, importance, scheme, torch.bfloat16)
    clipped = weighted_error(w, scale, zero, importance, scheme)
    rtn = weighted_error(w, rtn_scale, rtn_zero, importance, scheme)
    assert torch.all(clipped <= rtn)
    if scheme.bits == 4:
        assert float(clipped.sum()) < 0.95 * float(rtn.sum())
    packed = clip_quantize(w, importance, scheme)
    assert torch.equal(packed.scale, scale)
