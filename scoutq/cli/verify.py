"""`scoutq verify`: re-check a quantized output against its manifest, config.json and quantization_config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scoutq.cli._output import byte_progress, console, result_json
from scoutq.pipeline.verify import verify_output

EXAMPLES = """Examples:

  scoutq verify ./scout-w4a16

  scoutq verify ./scout-w4a16 --json > verify.json

  scoutq verify ./Llama-4-Scout-GPTQ-from-elsewhere --foreign

Exit code 0: every check passed; 1: the first problem, on one line naming the file and tensor.
"""


def verify(
    dst: Annotated[Path, typer.Argument(help="A directory written by `scoutq quantize` (or, with --foreign, any tool).")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a summary line.")] = False,
    foreign: Annotated[bool, typer.Option(
        help="Another tool's checkpoint (compressed-tensors, GPTQ, AWQ, bitsandbytes): no manifest to hash; "
             "decode every Linear and check its shape and values.")] = False,
) -> None:
    """Verify a quantized checkpoint: file hashes, tensor names, dtypes and shapes, and quantized values.

    Re-hashes every file against scoutq-manifest.json, checks every tensor against config.json and
    its quantization_config, then unpacks every quantized weight and checks its scales are finite
    and non-zero. Reads one module at a time, so memory stays small.
    """
    if foreign:
        from scoutq.cli._output import step_progress_plain
        from scoutq.pipeline.verify_foreign import verify_foreign

        with step_progress_plain() as progress:
            task = progress.add_task("decode modules", total=None)
            checked = verify_foreign(dst, on_module=lambda done, total: progress.update(task, completed=done,
                                                                                           total=total))
        if json:
            result_json({"ok": True, **checked.__dict__})
            return
        routers = f"; quantized routers: {', '.join(checked.quantized_routers)}" if checked.quantized_routers else ""
        console.print(f"ok: {checked.format}: {checked.quantized_modules} quantized and "
                      f"{checked.full_precision_modules} full-precision Linears decode to their shapes{routers}")
        return
    with byte_progress("verify") as progress:
        task = progress.add_task("hash files", total=None)
        report = verify_output(dst, on_progress=lambda n, total: progress.update(task, total=total, advance=n))
    if json:
        result_json({"ok": True, **report.__dict__})
        return
    console.print(
        f"ok: {report.files} files, {report.tensors} tensors, {report.quantized_modules} quantized modules verified")
