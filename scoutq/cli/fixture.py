"""`scoutq fixture`: write a test or demo checkpoint in the real Hugging Face layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scoutq.checkpoint.writer import atomic_write_json
from scoutq.cli._output import byte_progress, console, human_bytes, result_json, step_progress
from scoutq.errors import ScoutqError
from scoutq.fixtures import STAMP_NAME, Preset, fixture_identity, read_stamp

EXAMPLES = """Examples:

  scoutq fixture out/tiny --preset tiny

  scoutq fixture out/tiny-trained --preset tiny-trained --seed 0

  scoutq fixture out/tiny-trained-mine --preset tiny-trained --text notes.txt --text more.txt

  scoutq fixture /data/scout-3 --preset scout-layers --layers 3
"""


def fixture(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    preset: Annotated[Preset, typer.Option(help="Which checkpoint to build.")],
    seed: Annotated[int, typer.Option(help="Seed for weights (and training).")] = 0,
    layers: Annotated[int, typer.Option(help="Decoder layers, for scout-layers.", min=1)] = 1,
    text: Annotated[
        list[Path] | None, typer.Option(help="Training text files for tiny-trained (default: CPython's docs).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
    reuse: Annotated[bool, typer.Option(help="Keep OUT if it already holds this exact fixture.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the fixture's stamp as JSON.")] = False,
) -> None:
    """Build a checkpoint: tiny random (multimodal or text-only), tiny trained, or real-Scout-shape layers.

    scout-layers needs about 4.4 GB of disk per layer plus 4.3 GB; it is generated in 64 MB
    pieces, so memory stays small whatever --layers is.
    """
    if text and preset != Preset.TINY_TRAINED:
        raise ScoutqError("--text applies to --preset tiny-trained only")
    identity = fixture_identity(preset, seed, layers if preset == Preset.SCOUT_LAYERS else None, text)
    if reuse and (stamp := read_stamp(out)) and all(stamp.get(k) == v for k, v in identity.items()):
        console.print(f"reusing {out} ({preset.value}, seed {seed})") if not json_output else result_json(stamp)
        return

    report: dict[str, Any] = {}
    overwrite = overwrite or reuse
    if preset in (Preset.TINY, Preset.TINY_TEXT):
        from scoutq.fixtures.random_presets import build_tiny

        build_tiny(out, seed=seed, text_only=preset == Preset.TINY_TEXT, overwrite=overwrite)
    elif preset == Preset.SCOUT_LAYERS:
        from scoutq.fixtures.random_presets import build_scout_layers, scout_layers_bytes

        total = scout_layers_bytes(layers)
        with byte_progress(f"scout-layers x{layers}") as progress:
            task = progress.add_task(f"scout-layers x{layers}", total=total)
            build_scout_layers(out, layers, seed=seed, overwrite=overwrite, on_bytes=lambda n: progress.advance(task, n))
    else:
        from scoutq.fixtures.trained import build_tiny_trained

        with step_progress("training tiny-trained") as progress:
            task = progress.add_task("training tiny-trained", total=None, loss=float("nan"))

            def show(step: int, total: int, loss: float) -> None:
                progress.update(task, completed=step, total=total, loss=loss)

            report = build_tiny_trained(out, seed=seed, texts=text, overwrite=overwrite, on_step=show)

    stamp = {**identity, **report}
    atomic_write_json(out / STAMP_NAME, stamp)
    if json_output:
        result_json(stamp)
        return
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    console.print(f"wrote {out} ({preset.value}, seed {seed}, {human_bytes(size)})")
    for key, value in report.items():
        console.print(f"  {key}: {value}")
