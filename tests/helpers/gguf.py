"""GGUF test helpers: exports through the CLI, and fixture variants llama.cpp can run exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from scoutq.checkpoint.gguf_file import GgufFile
from scoutq.cli.app import main
from scoutq.model.gguf_load import dequantized


def export(src: Path, recipe: str, out: Path, *extra: str) -> Path:
    """`scoutq quantize SRC --recipe RECIPE --out OUT` in process; fails the test on a nonzero exit."""
    try:
        main(["quantize", str(src), "--recipe", recipe, "--out", str(out), *extra])
    except SystemExit as done:
        assert done.code in (0, None), f"quantize {recipe} exited {done.code}"
    return out


def float32_variant(src: Path, dst: Path, chunk: int | None = None) -> Path:
    """A copy of a checkpoint with fp32 weights (a GGUF of it is F32, which llama.cpp multiplies
    without rounding activations), optionally with another attention chunk size."""
    if dst.exists():
        return dst
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.suffix == ".safetensors":
            save_file({k: v.float() for k, v in load_file(entry).items()}, partial / entry.name, metadata={"format": "pt"})
        elif entry.name == "config.json":
            config = json.loads(entry.read_text())
            text = config.get("text_config", config)
            if chunk is not None:
                text["attention_chunk_size"] = chunk
            (partial / entry.name).write_text(json.dumps(config))
        elif entry.name == "model.safetensors.index.json":
            index = json.loads(entry.read_text())
            index["metadata"]["total_size"] *= 2
            (partial / entry.name).write_text(json.dumps(index))
        elif entry.is_file():
            shutil.copyfile(entry, partial / entry.name)
    partial.rename(dst)
    return dst


def reader_equals_scoutq(path: Path) -> dict[str, bool]:
    """Per ggml type in the file: whether the gguf package's reader and dequantizer give exactly
    the values scoutq's dequantization gives, for every tensor of that type."""
    import gguf

    file = GgufFile.open(path)
    reader = gguf.GGUFReader(path)
    equal: dict[str, bool] = {}
    for tensor in reader.tensors:
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        ours = dequantized(file, tensor.name)
        kind = file.tensors[tensor.name].kind
        same = ours.shape == theirs.shape and torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs)))
        equal[kind] = equal.get(kind, True) and same
    return equal
