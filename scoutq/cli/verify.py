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

Exit code 0: every check passed; 1: the first problem, on one line naming the file and tensor.
"""


def verify(
    dst: Annotated[Path, typer.Argument(help="A directory written by `scoutq quantize`.")],
    json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a summary line.")] = False,
) -> None:
    """Verify a quantized checkpoint: file hashes, tensor names, dtypes and shapes, and quantized values.

    Re-hashes every file against scoutq-manifest.json, checks every tensor against config.json and
    its quantization_config, then unpacks every quantized weight and checks its scales are finite
    and non-zero. Reads one module at a time, so memory stays small.
    """
    with byte_progress("verify") as progress:
        task = progress.add_task("hash files", total=None)
        report = verify_output(dst, on_progress=lambda n, total: progress.update(task, total=total, advance=n))
    if json:
        result_json({"ok": True, **report.__dict__})
        return
    console.print(
        f"ok: {report.files} files, {report.tensors} tensors, {report.quantized_modules} quantized modules verified")
