"""`scoutq inspect`: what a checkpoint holds, from safetensors headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scoutq.checkpoint.reader import Checkpoint
from scoutq.checkpoint.summary import summarize
from scoutq.cli._output import console, human_bytes, human_count, result_json, table

EXAMPLES = """Examples:

  scoutq inspect ./Llama-4-Scout-17B-16E-Instruct

  scoutq inspect ./scout --json > scout.json
"""


def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (config.json + safetensors shards).")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Show a checkpoint's architecture, and its parameters and bytes by role and dtype.

    Reads config.json and the safetensors headers only, so it is instant on a 217 GB checkpoint.
    """
    opened = Checkpoint.open(checkpoint)
    if "quantization_config" not in opened.config_json:
        opened.validate_shapes()  # quantized outputs are checked in depth by `scoutq verify`
    summary = summarize(opened)
    if json:
        result_json(summary)
        return
    arch, params = summary["architecture"], summary["parameters"]
    console.print(
        f"[bold]{summary['directory']}[/]  {summary['layout']} layout, {summary['shards']} shard(s), "
        f"{summary['tensors']} tensors, {human_bytes(summary['bytes'])}"
    )
    table(
        "Architecture",
        ["", "value"],
        [
            ["layers (MoE / dense / NoPE)", f"{arch['layers']} ({arch['moe_layers']} / {arch['dense_layers']} / {arch['nope_layers']})"],
            ["routed experts, top-k", f"{arch['experts']}, top-{arch['experts_per_token']} + shared expert"],
            ["hidden / expert width", f"{arch['hidden_size']} / {arch['expert_width']}"],
            ["attention heads / KV heads x dim", f"{arch['attention_heads']} / {arch['kv_heads']} x {arch['head_dim']}"],
            ["attention chunk", str(arch["attention_chunk_size"])],
            ["vocabulary", str(arch["vocab_size"])],
            ["parameters (text + vision)", f"{human_count(params['total'])} ({human_count(params['text'])} + {human_count(params['vision'])})"],
            ["active per token", human_count(params["active_per_token"])],
        ],
    )
    table(
        "Parameters by role",
        ["role", "dtype", "tensors", "parameters", "bytes"],
        [[r["role"], r["dtype"], str(r["tensors"]), human_count(r["parameters"]), human_bytes(r["bytes"])] for r in summary["roles"]],
        right_align_from=2,
    )
