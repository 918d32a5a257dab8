"""The quantized runtime against transformers on the same quantized checkpoint.

transformers loads scoutq's compressed-tensors output and, with dequantize=True in fp32,
computes with exactly the dequantized bf16 weights (tests/pipeline/test_consumers.py shows that). The
scoutq runtime with the `reference` backend does the same math in fp32, so logits must agree
to 1e-4 (the same bound as the bf16-model equivalence). The `cpu` backend then runs bf16
kernels: it is held to the reference by next-token agreement and a loose logit bound, since
one flipped top-1 routing decision in a random tiny model moves a token's logits a lot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import scoutq
from scoutq.cli.app import main
from scoutq.kernels import cpu
from scoutq.model.quantized import QuantExperts, QuantLinear

transformers = pytest.importorskip("transformers")

RECIPES = ["w4a16-g128", "w8a16", "mixed"]


def quantize(src: Path, recipe: str, out: Path) -> Path:
    try:
        main(["quantize", str(src), "--recipe", recipe, "--out", str(out)])
    except SystemExit as done:
        assert done.code in (0, None)
    return out


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {recipe: quantize(tiny_checkpoint, recipe, root / recipe) for recipe in RECIPES + ["w4a16-g128-asym"]}


def token_ids(batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("recipe", RECIPES)
def test_reference_backend_matches_transformers(recipe: str, quantized: dict[str, Path]) -> None:
    if recipe == "mixed":
        # transformers decodes every per-expert module with one scheme under dequantize=True,
        # so "mixed" (int4 experts, int8 shared/attention) only loads compressed; in fp32 the
        # compressed path dequantizes in fp32, which tests/pipeline/test_consumers.py pins down.
        pytest.skip("transformers cannot dequantize mixed-scheme MoE checkpoints (see test_consumers.py)")
    from transformers import CompressedTensorsConfig

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        quantized[recipe], dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ours = scoutq.load_model(quantized[recipe], dtype=torch.float32, backend="reference")
    ids = token_ids()
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("recipe", RECIPES + ["w4a16-g128-asym"])
@pytest.mark.parametrize("kernels", ["packed and tiles", "dense below 2 MiB"])
def test_cpu_backend_agrees_with_reference(recipe: str, kernels: str, quantized: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every weight of the tiny fixture is below cpu.DENSE_BELOW_BYTES, which the cpu backend
    multiplies densely; with the threshold at 0 the same model runs the packed and tile kernels."""
    if kernels == "packed and tiles":
        monkeypatch.setattr(cpu, "DENSE_BELOW_BYTES", 0)
    ids = token_ids()
    with torch.no_grad():
        reference = scoutq.load_model(quantized[recipe], dtype=torch.float32, backend="reference")(ids)
        fast = scoutq.load_model(quantized[recipe], dtype=torch.bfloat16, backend="cpu")(ids).float()
    agreement = (fast.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, f"next-token agreement {agreement:.2f}"
    assert (fast - reference).abs().mean().item() <= 0.02 * reference.abs().mean().item() + 1e-3


def test_packed_weights_stay_packed(quantized: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "DENSE_BELOW_BYTES", 0)  # the tiny weights would be kept dense otherwise
    model = scoutq.load_model(quantized["mixed"], backend="cpu")
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(experts) == 4 and len(linears) == 4 * (4 + 3)  # attention + shared expert, per layer
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Embeddings, lm_head, norms and routers only: nothing quantized was dequantized into a parameter.
    config = model.config
    expected = (2 * config.vocab_size * config.hidden_size + config.hidden_size * (1 + 2 * 4)
                + 4 * config.num_local_experts * config.hidden_size) * 2
    assert dense_bytes == expected


def test_quantized_model_decodes_with_cache(quantized: dict[str, Path]) -> None:
    model = scoutq.load_model(quantized["w4a16-g128"], dtype=torch.float32, backend="reference")
    ids = token_ids(1, 24)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :8], cache)] + [model(ids[:, t : t + 1], cache) for t in range(8, 24)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_run_command_generates_and_reports_speed(quantized: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import json

    try:
        main(["run", str(quantized["w4a16-g128"]), "--prompt", "The with statement", "--max-new-tokens", "6",
              "--backend", "cpu", "--json"])
    except SystemExit as done:
        assert done.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["generated_tokens"] == 6 and report["prompt_tokens"] > 1
    assert report["prefill_tokens_per_second"] > 0 and report["decode_tokens_per_second"] > 0
    assert report["kernels"] and all(count > 0 for count in report["kernels"].values())  # which kernels ran


@pytest.mark.parametrize("recipe", ["w4a16-g128"])  # every scheme is covered kernel by kernel (test_triton_moe.py)
def test_cuda_backend_agrees_with_reference(recipe: str, quantized: dict[str, Path]) -> None:
    """The GPU backend (grouped Triton MoE kernel, Triton or torch Linears) on the whole model, in
    Triton's interpreter on CPU tensors where no GPU is visible. fp32 activations; the kernel
    dequantizes in fp32 where the reference rounds each weight to the bf16 scale's dtype (a
    relative 2^-9 per weight), so the tolerance is 4e-3 of the logits' scale (measured 8e-4); on a
    GPU, which multiplies in bf16, the cpu backend's bounds."""
    pytest.importorskip("triton")
    from scoutq.kernels.triton_moe import interpreted
    from scoutq.model.quantized import GroupedExperts, kernels_used

    device = "cpu" if interpreted() else "cuda"
    ids = token_ids(batch=1, length=12)
    with torch.no_grad():
        reference = scoutq.load_model(quantized[recipe], dtype=torch.float32, backend="reference")(ids)
        model = scoutq.load_model(quantized[recipe], device=device, dtype=torch.float32, backend="cuda")
        assert any(isinstance(m, GroupedExperts) for m in model.modules())
        got = model(ids.to(device)).cpu()
    if device == "cpu":
        assert (got - reference).abs().max().item() <= 4e-3 * reference.abs().max().item()
        assert torch.equal(got.argmax(-1), reference.argmax(-1))
    else:  # a GPU multiplies in bf16: the cpu backend's bounds (test_cpu_backend_agrees_with_reference)
        assert (got.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.9
        assert (got - reference).abs().mean().item() <= 0.02 * reference.abs().mean().item() + 1e-3
    assert kernels_used(model)["triton grouped MoE"] > 0


def test_unknown_backend_is_one_clear_error(quantized: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", str(quantized["w8a16"]), "--prompt", "x", "--backend", "tpu"])
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.startswith("error:") and "tpu" in err and len(err.strip().splitlines()) == 1
