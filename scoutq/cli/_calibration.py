"""What `scoutq quantize` shows of a calibrated run: progress per layer and step, and the
coverage summary. (The layer walk's memory estimate is scoutq.calibrate.estimate.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scoutq.calibrate.job import LayerProgressFn
from scoutq.cli._output import console, error_console, table
from scoutq.stream.hooks import ProgressFn


@contextmanager
def calibration_progress(enabled: bool) -> Iterator[tuple[LayerProgressFn | None, ProgressFn | None]]:
    """Two bars on stderr: layers done, and the steps (attention, experts) inside the current layer."""
    if not enabled:
        yield None, None
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=error_console)
    layers = progress.add_task("calibrate: layers", total=None)
    steps = progress.add_task("layer", total=None)

    def on_layer(layer: int, total: int) -> None:
        progress.update(layers, completed=layer, total=total)

    def on_step(what: str, done: int, total: int) -> None:
        progress.update(steps, description=f"layer step: {what}", completed=done, total=total)
        if what == "done":
            task = progress.tasks[layers]
            progress.update(layers, completed=(task.completed or 0) + 1)

    with progress:
        yield on_layer, on_step


def coverage_summary(coverage: dict[str, Any]) -> None:
    """Per layer: routed tokens per expert (least, most) and the policies applied; a warning
    line for every expert below min_tokens."""
    rows = []
    for entry in coverage["layers"]:
        experts = entry["experts"]
        if not experts:
            continue
        routed = [e["routed_tokens"] for e in experts]
        policies = Counter(e["policy"] for e in experts)
        rows.append([str(entry["layer"]), str(entry["tokens"]), str(min(routed)), str(max(routed)),
                     ", ".join(f"{name} {count}" for name, count in sorted(policies.items()))])
    if rows:
        settings = coverage["settings"]
        table(f"Expert coverage ({settings['method']}, min_tokens {settings['min_tokens']}, "
              f"all_experts {settings['all_experts']})",
              ["layer", "tokens", "fewest routed", "most routed", "policies"], rows, right_align_from=1)
    for low in coverage["below_min_tokens"]:
        error_console.print(f"[yellow]warning:[/] layer {low['layer']} expert {low['expert']}: "
                            f"{low['routed_tokens']} routed tokens < min_tokens {coverage['settings']['min_tokens']}; "
                            f"applied {low['policy']}")
    for name in coverage["round_to_nearest_modules"][:3]:
        error_console.print(f"[yellow]note:[/] {name} is quantized by round-to-nearest (no calibration data reaches it)")
    console.print("coverage.json written beside the checkpoint")

