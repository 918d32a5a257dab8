"""Shared fixtures: checkpoints built once per session, and the slow / GPU switches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Trained fixtures take minutes to build; keep them across runs (make clean removes them).
CACHE = Path(os.environ.get("SCOUTQ_TEST_CACHE", REPO / ".cache" / "scoutq"))
# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter. The switch must be set
# before triton is first imported (triton.language wraps its own helpers at import), so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests that build multi-GB fixtures")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="builds multi-GB fixtures; pass --run-slow (make test-slow)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tiny Llama 4, multimodal layout, sharded. Treat as read-only."""
    from scoutq.fixtures.random_presets import build_tiny

    return build_tiny(tmp_path_factory.mktemp("fixtures") / "tiny")


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tiny Llama 4, text-only layout. Treat as read-only."""
    from scoutq.fixtures.random_presets import build_tiny

    return build_tiny(tmp_path_factory.mktemp("fixtures") / "tiny-text", text_only=True)


@pytest.fixture(scope="session")
def tiny_trained() -> Path:
    """The default tiny-trained build, cached under .cache/scoutq (minutes the first time)."""
    from scoutq.cli.app import main

    out = CACHE / "tiny-trained"
    try:
        main(["fixture", str(out), "--preset", "tiny-trained", "--reuse"])
    except SystemExit as done:
        assert done.code in (0, None), f"building tiny-trained failed with exit code {done.code}"
    return out
