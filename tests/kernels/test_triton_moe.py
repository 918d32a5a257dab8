"""The grouped Triton MoE kernel equals the reference MoE (dequantize, then matmul per expert).

Runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py where no
GPU is visible), the same kernel a GPU compiles, and on the GPU where there is one: int4 symmetric and
asymmetric at groups 32, 64 and 128, int8 per channel; 1 to 64 tokens; uneven routing with
experts that receive no token; top-1 and top-2. Tolerance in the interpreter: fp32 throughout,
summed in another order than the reference's matmul: 1e-5 of the largest output. On a GPU the
kernel multiplies in bf16: 2e-2, the CPU packed kernels' bf16 bound.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from scoutq.kernels.triton_moe import TritonExperts, interpreted
from scoutq.model.moe import ExpertGroups, dispatch, route, swiglu_intermediate
from scoutq.quant.packed import PackedWeight
from scoutq.quant.rtn import rtn_quantize
from scoutq.quant.scheme import Scheme

HIDDEN, WIDTH, EXPERTS = 128, 128, 4
# The interpreter on CPU tensors where no GPU is visible (conftest.py sets TRITON_INTERPRET=1), else the GPU.
DEVICE = "cpu" if interpreted() else "cuda"
TOLERANCE = 1e-5 if DEVICE == "cpu" else 2e-2  # fp32 in the interpreter; bf16 products on a GPU


def _experts(scheme: Scheme, seed: int) -> tuple[list[PackedWeight], list[PackedWeight]]:
    generator = torch.Generator().manual_seed(seed)
    gate_up = [rtn_quantize(torch.randn(2 * WIDTH, HIDDEN, generator=generator) * 0.05, scheme) for _ in range(EXPERTS)]
    down = [rtn_quantize(torch.randn(HIDDEN, WIDTH, generator=generator) * 0.05, scheme) for _ in range(EXPERTS)]
    return gate_up, down


def _reference(x: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor, gate_up: list[PackedWeight],
               down: list[PackedWeight]) -> torch.Tensor:
    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        fused = gate_up[e].dequantize().float()
        return swiglu_intermediate(rows, fused[:WIDTH], fused[WIDTH:]) @ down[e].dequantize().float().t()

    return dispatch(x, scores, chosen, EXPERTS, expert)


def _grouped(kernel: TritonExperts, x: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    groups = ExpertGroups.of(scores.to(DEVICE), chosen.to(DEVICE), EXPERTS)
    return kernel(x.to(DEVICE), groups.tokens, groups.scores, groups.bounds).cpu()


def _routing(tokens: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=generator)
    logits = torch.randn(tokens, EXPERTS, generator=generator)
    logits[:, 3] -= 100.0  # expert 3 never chosen; expert 0 favoured: uneven groups
    logits[:, 0] += 1.0
    scores, chosen = route(logits, top_k)
    return x, scores, chosen


SCHEMES = [Scheme(4, 32), Scheme(4, 64), Scheme(4, 128), Scheme(4, 32, symmetric=False),
           Scheme(4, 128, symmetric=False), Scheme(8, None), Scheme(8, None, symmetric=False)]


# Every scheme at 64 tokens (every expert's blocks full and ragged); 1 and 5 tokens (most experts
# empty) for one scheme of each kind.
CASES = [(scheme, 64) for scheme in SCHEMES] + [(Scheme(4, 128), 1), (Scheme(8, None), 1),
                                                 (Scheme(4, 32, symmetric=False), 5), (Scheme(8, None, symmetric=False), 5)]


@pytest.mark.parametrize(("scheme", "tokens"), CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_grouped_kernel_matches_the_reference_moe(scheme: Scheme, tokens: int) -> None:
    gate_up, down = _experts(scheme, seed=tokens)
    x, scores, chosen = _routing(tokens, top_k=1, seed=tokens)
    expected = _reference(x, scores, chosen, gate_up, down)
    got = _grouped(TritonExperts(gate_up, down, DEVICE), x, scores, chosen)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE * float(expected.abs().max()))


def test_top_2_routing_and_bf16_activations() -> None:
    scheme = Scheme(4, 32)
    gate_up, down = _experts(scheme, seed=7)
    x, scores, chosen = _routing(9, top_k=2, seed=7)
    expected = _reference(x, scores, chosen, gate_up, down)
    torch.testing.assert_close(_grouped(TritonExperts(gate_up, down, DEVICE), x, scores, chosen), expected, rtol=0,
                               atol=TOLERANCE * float(expected.abs().max()))
    got_bf16 = _grouped(TritonExperts(gate_up, down, DEVICE), x.bfloat16(), scores.bfloat16(), chosen)
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.float(), expected, rtol=0, atol=2e-2 * float(expected.abs().max()))


def test_no_tokens_at_all() -> None:
    gate_up, down = _experts(Scheme(4, 32), seed=1)
    x = torch.zeros(0, HIDDEN)
    out = _grouped(TritonExperts(gate_up, down, DEVICE), x, torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.int64))
    assert out.shape == (0, HIDDEN)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [Scheme(4, 128), Scheme(8, None)], ids=str)
@pytest.mark.parametrize("tokens", [1, 64])
def test_real_scout_shapes_on_the_gpu(scheme: Scheme, tokens: int) -> None:
    """Scout's MoE (hidden 5120, 16 experts of 8192) compiled on a GPU, against the reference on
    the same GPU. The GPU kernel multiplies in bf16 (fp32 accumulation): the CPU packed kernels'
    bf16 tolerance, 2e-2 of the largest output."""
    hidden, width, experts = 5120, 8192, 16
    generator = torch.Generator().manual_seed(tokens)
    gate_up = [rtn_quantize(torch.randn(2 * width, hidden, generator=generator) * 0.02, scheme) for _ in range(experts)]
    down = [rtn_quantize(torch.randn(hidden, width, generator=generator) * 0.02, scheme) for _ in range(experts)]
    x = torch.randn(tokens, hidden, generator=generator).cuda()
    scores, chosen = route(torch.randn(tokens, experts, generator=generator).cuda(), 1)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        fused = gate_up[e].to("cuda").dequantize().float()
        return swiglu_intermediate(rows, fused[:width], fused[width:]) @ down[e].to("cuda").dequantize().float().t()

    expected = dispatch(x, scores, chosen, experts, expert)
    groups = ExpertGroups.of(scores, chosen, experts)
    got = TritonExperts(gate_up, down, "cuda")(x, groups.tokens, groups.scores, groups.bounds)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))
