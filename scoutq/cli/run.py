"""`scoutq run`: greedy generation from a bf16 or quantized checkpoint, with tokens per second."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import torch
import typer

from scoutq.cli._output import console, result_json
from scoutq.checkpoint.gguf_file import GgufFile, is_gguf
from scoutq.errors import ScoutqError

EXAMPLES = """Examples:

  scoutq run out/tiny-trained --prompt "The with statement"

  scoutq run out/tiny-trained-w4 --prompt "The with statement" --backend cpu --max-new-tokens 64

  scoutq run out/tiny-q4_0.gguf --prompt "The with statement" --dtype fp32
"""
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (bf16 source or scoutq-quantized), or a .gguf file.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.", min=1)] = 32,
    backend: Annotated[str | None, typer.Option(help="Kernel backend for quantized weights: reference, cpu, bnb, cuda (default: cpu on the CPU).")] = None,
    dtype: Annotated[str, typer.Option(help="Activation dtype: bf16 or fp32.")] = "bf16",
    json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Greedy decoding with a KV cache; prints the text and prefill / decode tokens per second."""
    from tokenizers import Tokenizer

    from scoutq.evaluate.report import kernel_line
    from scoutq.model.generate import greedy_generate
    from scoutq.model.load import load_model
    from scoutq.model.quantized import kernels_used

    if dtype not in DTYPES:
        raise ScoutqError(f"--dtype {dtype!r}: choose bf16 or fp32")
    stop: set[int] = set()
    if is_gguf(checkpoint):  # the embedded vocabulary and its end-of-text id
        gguf_file = GgufFile.open(checkpoint)
        tokenizer = gguf_file.tokenizer()
        eos = gguf_file.key("tokenizer.ggml.eos_token_id")
        stop = {int(eos)} if eos is not None else set()
    else:
        tokenizer_file = checkpoint / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ScoutqError(f"{tokenizer_file}: missing; scoutq run needs the checkpoint's tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        generation_config = checkpoint / "generation_config.json"
        if generation_config.is_file():
            eos = jsonlib.loads(generation_config.read_text()).get("eos_token_id")
            stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    model = load_model(checkpoint, dtype=DTYPES[dtype], backend=backend)
    ids = tokenizer.encode(prompt).ids
    result = greedy_generate(model, ids, max_new_tokens, stop)
    text = tokenizer.decode(result.tokens)
    report = {"prompt": prompt, "completion": text, "prompt_tokens": result.prompt_tokens,
              "generated_tokens": len(result.tokens), "prefill_tokens_per_second": round(result.prefill_tokens_per_second, 1),
              "decode_tokens_per_second": round(result.decode_tokens_per_second, 1),
              "backend": backend or "default", "dtype": dtype, "kernels": kernels_used(model)}
    if json:
        result_json(report)
        return
    console.print(f"[bold]{prompt}[/]{text}")
    console.print(f"prefill {result.prompt_tokens} tokens: {report['prefill_tokens_per_second']} tok/s; "
                  f"decode {len(result.tokens)} tokens: {report['decode_tokens_per_second']} tok/s "
                  f"({dtype}, backend {report['backend']})")
    if report["kernels"]:
        console.print(f"kernels (calls): {kernel_line(report['kernels'])}")
