"""Reading a GGUF file (any tool's): its metadata, a Llama 4 text config, raw tensor bytes.

Parsing is the `gguf` package's (GGUFReader); this module turns its failures and the file's
inconsistencies into one line naming the file: not GGUF, truncated, an unknown tensor type,
tensor infos that run past the data or do not describe the file, a missing Llama 4 tensor.

The config is rebuilt from llama.cpp's `llama4.*` keys. Where llama.cpp fixes a setting in
code (chunk 8192, NoPE every 4th layer, temperature floor 8192 and scale 0.1, QK norm unless
128 experts), a file without scoutq's `scoutq.llama4.*` record gets llama.cpp's value, so a
llama.cpp-made file is evaluated as llama.cpp runs it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from scoutq.checkpoint.config import TextConfig, parse_text_config
from scoutq.errors import ScoutqError

# Types scoutq dequantizes itself (quant/ggml.py, torch float views); any other type the gguf
# package can dequantize (Q5_K, Q4_1, IQ4_XS, ...: what llama.cpp's mixes such as Q4_K_M carry) is
# read through its numpy dequantizer.
OWN_TYPES = {
    gguf.GGMLQuantizationType.F32: "f32",
    gguf.GGMLQuantizationType.F16: "f16",
    gguf.GGMLQuantizationType.BF16: "bf16",
    gguf.GGMLQuantizationType.Q4_0: "q4_0",
    gguf.GGMLQuantizationType.Q8_0: "q8_0",
    gguf.GGMLQuantizationType.Q4_K: "q4_k",
    gguf.GGMLQuantizationType.Q6_K: "q6_k",
}
ARCHITECTURE = "llama4"

# tokenizer.json pre-tokenizer regexes (the "original regex from tokenizer.json" llama.cpp's
# src/llama-vocab.cpp quotes for each of its pre-tokenizer types) and llama.cpp's names.
O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPLIT_REGEXES = {"llama4": O200K_REGEX, "llama-bpe": LLAMA3_REGEX}  # a Split, then a regex-free ByteLevel
BYTE_LEVEL = "gpt-2"  # ByteLevel with GPT-2's own regex


def is_gguf(path: Path) -> bool:
    """A regular file that starts with GGUF's magic."""
    try:
        with Path(path).open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    kind: str  # the ggml type's lower-case name: f32, bf16, q4_0, q8_0, q4_k, q6_k, q5_k, ...
    shape: tuple[int, ...]  # row-major (torch) order
    offset: int  # absolute byte offset in the file
    nbytes: int


class GgufFile:
    """An open, validated GGUF file of a Llama 4 text model."""

    def __init__(self, path: Path, reader: gguf.GGUFReader):
        self.path = path
        self.reader = reader
        self.metadata: dict[str, Any] = {name: field.contents() for name, field in reader.fields.items()
                                         if not name.startswith("GGUF.")}
        self.tensors: dict[str, GgufTensorInfo] = {}
        size = path.stat().st_size
        for tensor in reader.tensors:
            kind = OWN_TYPES.get(tensor.tensor_type, tensor.tensor_type.name.lower())
            end = int(tensor.data_offset) + int(tensor.n_bytes)
            if end > size:
                raise ScoutqError(f"{path}: truncated: tensor {tensor.name!r} ends at byte {end}, the file has {size}")
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            self.tensors[tensor.name] = GgufTensorInfo(tensor.name, kind, shape, int(tensor.data_offset),
                                                       int(tensor.n_bytes))
        # Writers end the file with the last tensor's data (padded to the alignment). More bytes
        # than that means the header announced fewer tensors than the file holds (or described
        # them wrongly), and every offset read from it is suspect.
        data_end = max((info.offset + info.nbytes for info in self.tensors.values()), default=reader.data_offset)
        alignment = int(self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        if size - data_end >= alignment:
            raise ScoutqError(f"{path}: {size - data_end} bytes follow the last tensor's data; the header's tensor "
                              f"count ({len(self.tensors)}) does not describe this file")

    @classmethod
    def open(cls, path: str | Path) -> GgufFile:
        path = Path(path)
        if not path.is_file():
            raise ScoutqError(f"{path}: no such GGUF file")
        if not is_gguf(path):
            raise ScoutqError(f"{path}: not a GGUF file (no GGUF magic)")
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError, struct.error,
                MemoryError) as err:
            raise ScoutqError(f"{path}: {_describe(path, err)}") from None
        opened = cls(path, reader)
        architecture = opened.metadata.get("general.architecture")
        if architecture != ARCHITECTURE:
            raise ScoutqError(f"{path}: architecture {architecture!r}; scoutq reads Llama 4 ({ARCHITECTURE}) GGUF files")
        return opened

    def info(self, name: str) -> GgufTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ScoutqError(f"{self.path}: missing tensor {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes as stored, uint8 [rows, row_bytes] (a 1-D tensor is one row)."""
        info = self.info(name)
        data = self.reader.data[info.offset : info.offset + info.nbytes]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return np.asarray(data).view(np.uint8).reshape(rows, -1)

    def key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(name, default)

    def text_config(self) -> TextConfig:
        return parse_text_config(self.config_json())

    def config_json(self) -> dict[str, Any]:
        """The Hugging Face text config this file describes (see the module docstring)."""
        arch = ARCHITECTURE

        def need(key: str) -> Any:
            value = self.metadata.get(f"{arch}.{key}")
            if value is None:
                raise ScoutqError(f"{self.path}: metadata {arch}.{key} is missing")
            return value

        layers = int(need("block_count"))
        experts = int(need("expert_count"))
        step = int(self.key(f"{arch}.interleave_moe_layer_step", 1))
        head_dim = int(self.key(f"{arch}.attention.key_length", 0) or int(need("embedding_length")) // int(need("attention.head_count")))

        def recorded(name: str, fallback: Any) -> Any:
            """scoutq's record of a setting llama.cpp fixes in code, else llama.cpp's value."""
            return self.metadata.get(f"scoutq.llama4.{name}", fallback)

        pattern = self.key(f"{arch}.attention.sliding_window_pattern")
        chunked = [bool(v) for v in pattern] if isinstance(pattern, list) else [(i + 1) % 4 != 0 for i in range(layers)]
        chunked = [bool(v) for v in recorded("chunked_layers", chunked)]
        no_rope = recorded("no_rope_layers", [int((i + 1) % 4 != 0) for i in range(layers)])
        moe = recorded("moe_layers", [i for i in range(layers) if step > 0 and (i + 1) % step == 0])
        text: dict[str, Any] = {
            "model_type": "llama4_text",
            "vocab_size": int(self.key(f"{arch}.vocab_size", 0) or len(self.key("tokenizer.ggml.tokens", []))),
            "hidden_size": int(need("embedding_length")),
            "intermediate_size": int(need("expert_feed_forward_length")),
            "intermediate_size_mlp": int(self.key(f"{arch}.feed_forward_length", 0) or need("expert_feed_forward_length")),
            "num_hidden_layers": layers,
            "num_attention_heads": int(need("attention.head_count")),
            "num_key_value_heads": int(need("attention.head_count_kv")),
            "head_dim": head_dim,
            "num_local_experts": experts,
            "num_experts_per_tok": int(need("expert_used_count")),
            "interleave_moe_layer_step": step,
            "moe_layers": [int(i) for i in moe],
            "no_rope_layers": [int(v) for v in no_rope],
            "layer_types": ["chunked_attention" if c else "full_attention" for c in chunked],
            "attention_chunk_size": int(recorded("attention_chunk_size", 8192)),
            "use_qk_norm": bool(recorded("use_qk_norm", experts != 128)),
            "attn_temperature_tuning": bool(recorded("attn_temperature_tuning", True)),
            "floor_scale": float(recorded("floor_scale", 8192.0)),
            "attn_scale": float(recorded("attn_scale", 0.1)),
            "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(self.key(f"{arch}.context_length", 8192)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "rope_parameters": self._rope(),
        }
        for name, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                          ("pad_token_id", "tokenizer.ggml.padding_token_id")):
            if key in self.metadata:
                text[name] = int(self.metadata[key])
        return {"model_type": "llama4_text", **text}

    def tokenizer(self) -> Tokenizer:
        """The embedded byte-level BPE vocabulary as a `tokenizers` Tokenizer (what llama.cpp
        tokenizes with: same tokens, merges, pre-tokenizer and BOS rule)."""
        if self.key("tokenizer.ggml.model") != "gpt2":
            raise ScoutqError(f"{self.path}: tokenizer.ggml.model {self.key('tokenizer.ggml.model')!r}; scoutq reads "
                              "byte-level BPE (gpt2) vocabularies")
        tokens: list[str] = self.key("tokenizer.ggml.tokens", [])
        types: list[int] = self.key("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in self.key("tokenizer.ggml.merges", [])]
        vocab = {token: i for i, token in enumerate(tokens)}
        tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
        pre = self.key("tokenizer.ggml.pre", BYTE_LEVEL)
        if pre == BYTE_LEVEL:
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre in SPLIT_REGEXES:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            raise ScoutqError(f"{self.path}: pre-tokenizer {pre!r} is not one scoutq knows ({BYTE_LEVEL}, "
                              f"{', '.join(SPLIT_REGEXES)})")
        tokenizer.decoder = decoders.ByteLevel()
        special = [AddedToken(tokens[i], special=types[i] == gguf.TokenType.CONTROL, normalized=False)
                   for i in range(len(tokens)) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
        tokenizer.add_tokens(special)
        bos = self.key("tokenizer.ggml.bos_token_id")
        if self.key("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_token = tokens[int(bos)]
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, int(bos))])
        return tokenizer

    def _rope(self) -> dict[str, Any]:
        theta = float(self.key(f"{ARCHITECTURE}.rope.freq_base", 500000.0))
        recorded = self.key("scoutq.llama4.rope")
        if isinstance(recorded, str):
            rope = json.loads(recorded)
            params = {"rope_theta": rope["theta"], "rope_type": rope["rope_type"]}
            if rope["rope_type"] == "llama3":
                params |= {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}
            return params
        if "rope_freqs.weight" in self.tensors:
            factors = self.raw("rope_freqs.weight").view(np.float32).reshape(-1)
            return {"rope_theta": theta, "rope_type": "default", "frequency_factors": [float(f) for f in factors]}
        return {"rope_theta": theta, "rope_type": "default"}


def _describe(path: Path, err: Exception) -> str:
    """gguf's reader fails with numpy's words; say what they mean for the file."""
    text = str(err)
    if "reshape" in text or "buffer is too small" in text or "out of bounds" in text:
        return f"truncated or corrupt GGUF: its header describes more data (or more tensors) than the file holds ({text})"
    if "is not a valid GGMLQuantizationType" in text:
        return f"a tensor has an unknown ggml type ({text})"
    return f"not a readable GGUF file ({type(err).__name__}: {text})"
