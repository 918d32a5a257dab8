"""`scoutq bench kernels|moe`: timings at real Scout shapes, printed (targets are read off)."""

from __future__ import annotations

from typing import Annotated

import typer

from scoutq.cli._output import console, result_json, table

app = typer.Typer(help="Benchmarks at real Scout shapes; figures are printed, never asserted.", no_args_is_help=True)

EXAMPLES = """Examples:

  scoutq bench kernels

  scoutq bench moe --json > moe.json
"""


def _render(title: str, rows: list[dict[str, object]], json: bool) -> None:
    if json:
        result_json(rows)
        return
    table(title, ["variant", "tokens", "ms", "x bf16", "weight GB/s", "of read BW"],
          [[str(r["variant"]), str(r["tokens"]), f"{r['ms']:.3f}", f"{r['speedup_vs_bf16']:.2f}",
            f"{r['weight_gb_s']:.2f}", f"{float(r['fraction_of_read_bw']):.0%}"] for r in rows])  # type: ignore[arg-type]


@app.command("kernels", epilog=EXAMPLES)
def kernels(
    bnb: Annotated[bool, typer.Option(help="Include bitsandbytes nf4 / int8 when installed.")] = True,
    json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
) -> None:
    """One expert projection [8192 x 5120]: fp32, bf16, int8, int4 (and bitsandbytes), 1-64 tokens."""
    from scoutq.bench.kernels import as_dicts, kernel_rows
    from scoutq.kernels import native

    with console.status("timing kernels at Scout's expert shape"):
        rows = as_dicts(kernel_rows(with_bnb=bnb))
    _render(f"Expert matmul, W [8192, 5120]; native int4 kernel: {native.status()}", rows, json)


@app.command("moe", epilog=EXAMPLES)
def moe(json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False) -> None:
    """One Scout MoE layer (16 experts top-1 + shared expert): bf16, int8, int4, 1-64 tokens."""
    from scoutq.bench.kernels import as_dicts, moe_rows

    with console.status("timing a Scout MoE layer"):
        rows = as_dicts(moe_rows())
    _render("MoE layer step, hidden 5120, 16 experts top-1 + shared", rows, json)
