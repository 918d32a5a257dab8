"""The one place CLI commands print through: rich for people, JSON for machines, errors on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)


def result_json(value: Any) -> None:
    """Machine-readable output: one JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def error(message: str) -> None:
    error_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[str]], right_align_from: int = 1) -> None:
    grid = Table(title=title, title_justify="left", title_style="bold")
    for i, name in enumerate(columns):
        grid.add_column(name, justify="right" if i >= right_align_from else "left")
    for row in rows:
        grid.add_row(*row)
    console.print(grid)


def byte_progress(description: str, enabled: bool = True) -> Progress:
    """A progress bar over bytes: done/total, throughput and ETA (stderr, so --json stays clean);
    drawing nothing when not enabled (the other ranks of a multi-process run)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=error_console,
        transient=False,
        disable=not enabled,
    )


def step_progress(description: str) -> Progress:
    """A progress bar over steps with the current loss and an ETA (stderr)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=error_console,
    )


def human_bytes(count: float) -> str:
    """Decimal units as README and the GB/s figures use them: "4.71 MB", "217.00 GB", "512 bytes"."""
    return filesize.decimal(int(count), precision=2)


def human_count(count: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(count) < 1000 or unit == "B":
            return f"{count:.0f}" if unit == "" else f"{count:.2f}{unit}"
        count /= 1000
    raise AssertionError("unreachable")


def step_progress_plain() -> Progress:
    """A progress bar over steps with an ETA (stderr)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=error_console,
    )
