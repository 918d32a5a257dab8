"""Running the scoutq CLI in-process from tests, exit code included."""

from __future__ import annotations

import pytest

from scoutq.cli.app import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `scoutq ARGV`, with earlier captured output discarded."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quantize_or_fail(src: object, recipe: str, dst: object, *extra: str) -> None:
    """`scoutq quantize SRC --recipe R --out DST` for a fixture; fails the test on a non-zero exit."""
    try:
        main(["quantize", str(src), "--recipe", recipe, "--out", str(dst), *extra])
    except SystemExit as done:
        assert done.code in (0, None), f"quantize {recipe} exited {done.code}"
