"""`load_model`: a scoutq Llama 4 module from a checkpoint directory, read tensor by tensor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from scoutq.checkpoint.gguf_file import is_gguf
from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ConfigError
from scoutq.model.llama4 import Llama4ForCausalLM


def _source_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, str, bool]]:
    """(module parameter name, checkpoint key, transpose last two dims) for every parameter."""
    layout, config = checkpoint.layout, checkpoint.config
    yield "embed_tokens.weight", layout.embed_key, False
    yield "norm.weight", layout.norm_key, False
    yield "lm_head.weight", layout.embed_key if config.tie_word_embeddings else layout.lm_head_key, False
    for i in range(config.num_hidden_layers):
        parts = ["input_layernorm", "post_attention_layernorm"] + [f"self_attn.{p}_proj" for p in "qkvo"]
        if config.is_moe_layer(i):
            parts += ["feed_forward.router"] + [f"feed_forward.shared_expert.{p}_proj" for p in ("gate", "up", "down")]
            # Fused experts are stored [E, in, out]; the module keeps nn.Linear's [E, out, in].
            yield f"layers.{i}.feed_forward.experts.gate_up", layout.gate_up_key(i), True
            yield f"layers.{i}.feed_forward.experts.down", layout.down_key(i), True
        else:
            parts += [f"feed_forward.{p}_proj" for p in ("gate", "up", "down")]
        for part in parts:
            yield f"layers.{i}.{part}.weight", layout.layer_key(i, f"{part}.weight"), False


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> Llama4ForCausalLM:
    """Load a Llama 4 checkpoint as a scoutq module: bf16 sources (multimodal or text-only HF
    layout), scoutq-quantized compressed-tensors outputs and GGUF files (any tool's) alike.

    Args:
        path: checkpoint directory with config.json and safetensors shards, or a .gguf file
            (dequantized at load; `backend` does not apply).
        device: where the weights live.
        dtype: activation dtype, and weight dtype of everything not quantized.
        backend: kernel backend for quantized weights (reference, cpu, bnb); default: the
            fastest for the device. Ignored for unquantized checkpoints.

    Returns:
        A module in eval mode; `model(input_ids [B, T])` returns logits [B, T, vocab].
    """
    if is_gguf(Path(path)):
        from scoutq.model.gguf_load import load_gguf

        return load_gguf(path, device, dtype)
    checkpoint = Checkpoint.open(path)
    if "quantization_config" in checkpoint.config_json:
        from scoutq.kernels import Backend, default_backend
        from scoutq.model.quantized import load_quantized

        try:
            chosen = Backend(backend) if backend else default_backend(device)
        except ValueError:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(b.value for b in Backend)}") from None
        return load_quantized(checkpoint, device, dtype, chosen)
    if checkpoint.config.hidden_act != "silu":
        raise ConfigError(f"config.json: hidden_act {checkpoint.config.hidden_act!r} is not supported (Llama 4 uses silu)")
    checkpoint.validate_shapes()

    with torch.device("meta"):
        model = Llama4ForCausalLM(checkpoint.config)
    state: dict[str, torch.Tensor] = {}
    for param, key, transpose in _source_tensors(checkpoint):
        tensor = checkpoint.read(key)
        if transpose:
            tensor = tensor.transpose(-1, -2)
        state[param] = tensor.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
