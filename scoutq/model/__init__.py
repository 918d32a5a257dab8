"""The Llama 4 text model: config, forward math, MoE dispatch, loading."""

from scoutq.checkpoint.config import TextConfig, load_text_config, parse_text_config
from scoutq.model.llama4 import KVCache, Llama4ForCausalLM
from scoutq.model.load import load_model

__all__ = ["KVCache", "Llama4ForCausalLM", "TextConfig", "load_model", "load_text_config", "parse_text_config"]
