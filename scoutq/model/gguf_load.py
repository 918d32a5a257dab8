"""A GGUF file (scoutq's or any tool's) as a scoutq Llama 4 module, dequantized.

Every tensor is dequantized once, at load, with quant/ggml.py's fp32 arithmetic (the same bits
as ggml's reference and the gguf package; types scoutq does not write, such as the Q5_K in
llama.cpp's Q4_K_M files, through the gguf package's own dequantizer), then held in the
requested dtype: fp32 keeps the
file's weights exactly, which is what comparing a GGUF against its bf16 source needs. The
module is the same `Llama4ForCausalLM` a safetensors checkpoint loads into, so eval, run and
latency measure a llama.cpp file through scoutq's runtime.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from scoutq.checkpoint.gguf_file import GgufFile
from scoutq.errors import ScoutqError
from scoutq.model.llama4 import Llama4ForCausalLM
from scoutq.quant import ggml

FLOAT_VIEWS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHARED = {"ffn_gate_shexp": "gate", "ffn_up_shexp": "up", "ffn_down_shexp": "down"}
DENSE = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
ATTENTION = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o"}


def dequantized(file: GgufFile, name: str) -> torch.Tensor:
    """One tensor in fp32 (float types widened exactly), in its row-major shape."""
    info = file.info(name)
    raw = np.array(file.raw(name))  # a copy: the file's map stays read-only
    if info.kind in FLOAT_VIEWS:
        values = torch.from_numpy(raw).view(FLOAT_VIEWS[info.kind]).float()
    elif info.kind in ggml.DEQUANTIZE:
        values = ggml.dequantize(torch.from_numpy(raw), info.kind, info.shape[-1])
    else:  # another tool's type (Q5_K in llama.cpp's Q4_K_M, ...): the gguf package's dequantizer
        try:
            values = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[info.kind.upper()]))
        except NotImplementedError:
            raise ScoutqError(f"{file.path}: tensor {name!r} has type {info.kind.upper()}, which neither scoutq nor "
                              "the gguf package can dequantize") from None
    return values.reshape(info.shape)


def _parameters(file: GgufFile, layers: int, moe_layers: set[int]) -> Iterator[tuple[str, list[str]]]:
    """(module parameter, the GGUF tensors it is made of) for every parameter."""
    yield "embed_tokens.weight", ["token_embd.weight"]
    yield "norm.weight", ["output_norm.weight"]
    yield "lm_head.weight", ["output.weight" if "output.weight" in file.tensors else "token_embd.weight"]
    for i in range(layers):
        block = f"blk.{i}"
        yield f"layers.{i}.input_layernorm.weight", [f"{block}.attn_norm.weight"]
        yield f"layers.{i}.post_attention_layernorm.weight", [f"{block}.ffn_norm.weight"]
        for part, proj in ATTENTION.items():
            yield f"layers.{i}.self_attn.{proj}_proj.weight", [f"{block}.{part}.weight"]
        if i in moe_layers:
            yield f"layers.{i}.feed_forward.router.weight", [f"{block}.ffn_gate_inp.weight"]
            yield f"layers.{i}.feed_forward.experts.gate_up", [f"{block}.ffn_gate_exps.weight",
                                                                f"{block}.ffn_up_exps.weight"]
            yield f"layers.{i}.feed_forward.experts.down", [f"{block}.ffn_down_exps.weight"]
            for part, proj in SHARED.items():
                yield f"layers.{i}.feed_forward.shared_expert.{proj}_proj.weight", [f"{block}.{part}.weight"]
        else:
            for part, proj in DENSE.items():
                yield f"layers.{i}.feed_forward.{proj}_proj.weight", [f"{block}.{part}.weight"]


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
              ) -> Llama4ForCausalLM:
    """Load a Llama 4 GGUF file as a scoutq module in eval mode (weights dequantized to dtype)."""
    file = GgufFile.open(path)
    config = file.text_config()
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for parameter, names in _parameters(file, config.num_hidden_layers, set(config.moe_layers)):
        # gate and up stack along the output rows: the module keeps [E, 2 * width, hidden].
        values = torch.cat([dequantized(file, name) for name in names], dim=-2) if len(names) > 1 \
            else dequantized(file, names[0])
        state[parameter] = values.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
