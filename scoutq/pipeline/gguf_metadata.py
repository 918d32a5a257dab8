"""The GGUF header: llama.cpp's `llama4` metadata, the embedded tokenizer and the tensor infos.

Keys are the ones llama.cpp's converter writes for Llama 4 and its loader reads
(conversion/llama.py `Llama4Model`, src/models/llama4.cpp), written through the `gguf`
package's GGUFWriter. llama.cpp fixes some Llama 4 settings in code instead of reading them
(chunk 8192, NoPE every 4th layer, temperature floor 8192 and scale 0.1, QK norm unless 128
experts); scoutq records the checkpoint's real values under `scoutq.llama4.*`, so its own
reader rebuilds the model exactly, and warns when llama.cpp would run something else.

The tokenizer is embedded as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`):
tokens by id with their types, merges, special ids, and the pre-tokenizer llama.cpp should
split text with, recognised from tokenizer.json's own pre-tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from scoutq import __version__
from scoutq.checkpoint.config import TextConfig
from scoutq.checkpoint.gguf_file import BYTE_LEVEL, SPLIT_REGEXES
from scoutq.checkpoint.reader import Checkpoint
from scoutq.errors import ScoutqError
from scoutq.quant.gguf_plan import ARCHITECTURE, GgufTensor
from scoutq.quant.plan import QuantPlan

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
GGML_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
}
# general.file_type names the file after its routed experts' type (llama.cpp's llama_ftype).
FILE_TYPES = {
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "f32": gguf.LlamaFileType.ALL_F32,
}

PRE_TOKENIZERS = {regex: name for name, regex in SPLIT_REGEXES.items()}

# What llama.cpp's Llama 4 graph assumes (src/models/llama4.cpp, src/llama-hparams.h).
LLAMA_CPP_CHUNK = 8192
LLAMA_CPP_NOPE_STEP = 4
LLAMA_CPP_FLOOR_SCALE = 8192.0
LLAMA_CPP_ATTN_SCALE = 0.1


def llama_cpp_warnings(config: TextConfig) -> list[str]:
    """Where llama.cpp would compute this model differently from its config (scoutq's own
    runtime reads the real values from the file)."""
    layers = config.num_hidden_layers
    warnings = []
    if any(config.chunked_attention) and config.attention_chunk_size != LLAMA_CPP_CHUNK:
        warnings.append(f"llama.cpp runs chunked attention in chunks of {LLAMA_CPP_CHUNK} tokens (fixed in its code); "
                        f"this model's chunk is {config.attention_chunk_size}, so llama.cpp's outputs differ beyond "
                        f"{config.attention_chunk_size} tokens")
    llama_cpp_rope = tuple((i + 1) % LLAMA_CPP_NOPE_STEP != 0 for i in range(layers))
    if any(config.chunked_attention) and config.use_rope != llama_cpp_rope:
        warnings.append(f"llama.cpp makes every {LLAMA_CPP_NOPE_STEP}th layer NoPE; this model's NoPE layers are "
                        f"{[i for i, rope in enumerate(config.use_rope) if not rope]}")
    nope = not all(config.use_rope)
    if nope and (not config.attn_temperature_tuning or config.floor_scale != LLAMA_CPP_FLOOR_SCALE
                 or config.attn_scale != LLAMA_CPP_ATTN_SCALE):
        warnings.append("llama.cpp always applies attention temperature tuning with floor 8192 and scale 0.1 on NoPE "
                        "layers; this model's settings differ")
    if config.use_qk_norm != (config.num_local_experts != 128):
        warnings.append("llama.cpp applies the QK norm unless the model has 128 experts; this model's use_qk_norm "
                        "differs")
    return warnings


def check_llama_cpp_layers(config: TextConfig, step: int) -> None:
    """llama.cpp places MoE layers by the interleave step alone; other placements cannot load."""
    expected = tuple(i for i in range(config.num_hidden_layers) if step > 0 and (i + 1) % step == 0)
    if tuple(sorted(config.moe_layers)) != expected:
        raise ScoutqError(f"MoE layers {list(config.moe_layers)} are not every {step}th layer, the only placement "
                          "llama.cpp's Llama 4 loader knows; this model cannot be written as GGUF")


def header_bytes(checkpoint: Checkpoint, plan: QuantPlan, tensors: list[GgufTensor], identity: str,
                 scratch: Path) -> bytes:
    """The file's header, KV data and tensor infos, as the gguf package writes them."""
    config = checkpoint.config
    step = int(config.extra.get("interleave_moe_layer_step", 1))
    check_llama_cpp_layers(config, step)
    path = scratch / "header.gguf"
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    _model_keys(writer, checkpoint, step, tensors)
    _tokenizer_keys(writer, checkpoint)
    writer.add_string("scoutq.version", __version__)
    writer.add_string("scoutq.identity", identity)
    writer.add_string("scoutq.recipe", plan.recipe.name)
    writer.add_string("scoutq.recipe_sha256", plan.recipe.fingerprint())
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=GGML_TYPES[tensor.kind])
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.read_bytes()
    path.unlink()
    return header


def _model_keys(writer: gguf.GGUFWriter, checkpoint: Checkpoint, step: int, tensors: list[GgufTensor]) -> None:
    config = checkpoint.config
    experts = next((t.kind for t in tensors if t.name.endswith("_exps.weight")), tensors[0].kind)
    writer.add_type("model")
    writer.add_name(checkpoint.directory.resolve().name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(FILE_TYPES[experts])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(int(config.extra.get("max_position_embeddings", 8192)))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size_mlp)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_interleave_moe_layer_step(step)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    # Which layers are chunked, as a per-layer pattern; the window itself llama.cpp fixes at
    # 8192 (its "0 = none" crashes its decoder, so a model without chunked layers gets an
    # all-False pattern instead).
    if any(config.chunked_attention):
        writer.add_sliding_window(int(config.attention_chunk_size or LLAMA_CPP_CHUNK))
    writer.add_sliding_window_pattern(list(config.chunked_attention))
    # The exact Llama 4 settings llama.cpp fixes in code, for readers that honour them.
    writer.add_uint32("scoutq.llama4.attention_chunk_size", int(config.attention_chunk_size or 0))
    writer.add_array("scoutq.llama4.no_rope_layers", [int(rope) for rope in config.use_rope])
    writer.add_array("scoutq.llama4.chunked_layers", [int(chunk) for chunk in config.chunked_attention])
    writer.add_array("scoutq.llama4.moe_layers", list(config.moe_layers))
    writer.add_bool("scoutq.llama4.use_qk_norm", config.use_qk_norm)
    writer.add_bool("scoutq.llama4.attn_temperature_tuning", config.attn_temperature_tuning)
    writer.add_float32("scoutq.llama4.floor_scale", config.floor_scale)
    writer.add_float32("scoutq.llama4.attn_scale", config.attn_scale)
    writer.add_string("scoutq.llama4.rope", json.dumps(config.rope.__dict__, sort_keys=True))


def _tokenizer_keys(writer: gguf.GGUFWriter, checkpoint: Checkpoint) -> None:
    directory = checkpoint.directory
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ScoutqError(f"{path}: missing; a GGUF file embeds the checkpoint's tokenizer")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ScoutqError(f"{path}: not a byte-level BPE tokenizer.json ({err})") from None
    if model.get("type") != "BPE":
        raise ScoutqError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export embeds BPE tokenizers only")
    size = max(checkpoint.config.vocab_size, len(vocab))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        index = int(added["id"])
        tokens[index] = added["content"]
        types[index] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _special_ids(writer, checkpoint, spec, {token: i for i, token in enumerate(tokens)})


def _pre_tokenizer(spec: dict[str, Any], path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's ByteLevel regex, or a Split
    regex followed by a regex-free ByteLevel (Llama 3 and Llama 4 tokenizers)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return BYTE_LEVEL
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    split = next((s for s in steps if s.get("type") == "Split"), None)
    regex = (split or {}).get("pattern", {}).get("Regex")
    if regex in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regex]
    raise ScoutqError(f"{path}: its pre-tokenizer is not one llama.cpp knows (GPT-2, Llama 3 or Llama 4 regex); "
                      "llama.cpp would split text differently")


def _special_ids(writer: gguf.GGUFWriter, checkpoint: Checkpoint, spec: dict[str, Any], ids: dict[str, int]) -> None:
    """BOS, EOS and padding ids, from tokenizer_config.json's tokens (or config.json's ids), and
    whether BOS is prepended (the post-processor's template starts with it)."""
    directory = checkpoint.directory
    settings: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        settings = json.loads(config_path.read_text(encoding="utf-8"))
    text = checkpoint.config.extra
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        token = settings.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        index = ids.get(token) if isinstance(token, str) else text.get(f"{name}_token_id")
        if isinstance(index, list):
            index = index[0] if index else None
        if index is not None:
            add(int(index))
    post = spec.get("post_processor") or {}
    single = post.get("single") or []
    add_bos = bool(single) and "SpecialToken" in single[0]
    writer.add_add_bos_token(bool(settings.get("add_bos_token", add_bos)))
    template = settings.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)


def read_identity(path: Path) -> str | None:
    """A finished scoutq GGUF's `scoutq.identity`, or None (not GGUF, not scoutq's, unreadable)."""
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields.get("scoutq.identity")
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
    except (OSError, ValueError, KeyError, IndexError):
        return None
