"""`scoutq bench kernels|moe`: timings at real Scout shapes, printed (targets are read off)."""

from __future__ import annotations

from typing import Annotated

import typer

from scoutq.cli._output import console, result_json, table

app = typer.Typer(help="Benchmarks at real Scout shapes; figures are printed, never asserted.", no_args_is_help=True)

EXAMPLES = """Examples:

  scoutq bench kernels

  scoutq bench moe --json > moe.json

  scoutq bench moe --device cuda

  scoutq bench crossover
"""


def _render(title: str, rows: list[dict[str, object]], json: bool, ratio: str = "x bf16") -> None:
    if json:
        result_json(rows)
        return
    table(title, ["variant", "tokens", "ms", ratio, "weight GB/s", "of read BW", "method"],
          [[str(r["variant"]), str(r["tokens"]), f"{r['ms']:.3f}", f"{r['speedup_vs_bf16']:.2f}",
            f"{r['weight_gb_s']:.2f}", f"{float(r['fraction_of_read_bw']):.0%}", str(r["method"])]  # type: ignore[arg-type]
           for r in rows])


@app.command("kernels", epilog=EXAMPLES)
def kernels(
    bnb: Annotated[bool, typer.Option(help="Include bitsandbytes nf4 / int8 when installed.")] = True,
    json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
) -> None:
    """One expert projection [8192 x 5120]: fp32, bf16, int8, int4 (and bitsandbytes), 1-1,024 tokens."""
    from scoutq.bench.kernels import as_dicts, kernel_rows
    from scoutq.kernels import native

    with console.status("timing kernels at Scout's expert shape"):
        rows = as_dicts(kernel_rows(with_bnb=bnb))
    _render(f"Expert matmul, W [8192, 5120]; native int4 kernel: {native.status()}", rows, json)


@app.command("moe", epilog=EXAMPLES)
def moe(
    json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
    device: Annotated[str, typer.Option(help="cpu (the cpu backend) or cuda (the cuda backend: grouped Triton "
                                             "MoE kernel).")] = "cpu",
) -> None:
    """One Scout MoE layer (16 experts top-1 + shared expert): bf16, int8, int4, 1-1,024 tokens."""
    from scoutq.bench.kernels import as_dicts, moe_rows
    from scoutq.stream.processes import resolve_device

    chosen = resolve_device(device)
    with console.status("timing a Scout MoE layer"):
        rows = as_dicts(moe_rows(str(chosen)))
    _render(f"MoE layer step on {chosen}, hidden 5120, 16 experts top-1 + shared", rows, json)


@app.command("crossover", epilog=EXAMPLES)
def crossover(json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False) -> None:
    """Packed kernel against dequantized tiles on one expert projection, 1-128 tokens: where the cpu
    backend switches (cpu.TILES_FROM_TOKENS)."""
    from scoutq.bench.kernels import as_dicts, crossover_rows
    from scoutq.kernels import cpu, tiles

    with console.status("timing the packed kernels against the tile path"):
        rows, found = crossover_rows()
    if json:
        result_json({"rows": as_dicts(rows), "crossover": found, "in_use": cpu.TILES_FROM_TOKENS})
        return
    _render(f"Packed kernel vs dequantized tiles, W [8192, 5120]; tile kernel: {tiles.status()}", as_dicts(rows),
            False, ratio="x packed")
    for bits, tokens in found.items():
        console.print(f"int{bits}: tiles faster from {tokens} tokens on (in use: {cpu.TILES_FROM_TOKENS[bits]})"
                      if tokens is not None else f"int{bits}: tiles never faster in 1-128 tokens")
