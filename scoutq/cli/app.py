"""The `scoutq` command: registers one module per command and maps errors to exit codes.

Exit codes: 0 success; 1 a problem with the input or the machine (one line on stderr naming
the file or tensor: bad input, a full disk, a read-only path, an I/O error); 2 a usage error.
Set SCOUTQ_DEBUG=1 to see the traceback behind an exit-1 error.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from rich.markup import escape

from scoutq.cli import _launch, bench, evaluation, fixture, inspect, quantize, run, tasks, verify
from scoutq.cli._output import error
from scoutq.errors import ScoutqError, os_error_line

app = typer.Typer(
    name="scoutq",
    help="Quantize and evaluate Llama 4 mixture-of-experts checkpoints, shard by shard.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("inspect", epilog=inspect.EXAMPLES)(inspect.inspect)
app.command("quantize", epilog=quantize.EXAMPLES)(quantize.quantize)
app.command("fixture", epilog=fixture.EXAMPLES)(fixture.fixture)
app.command("verify", epilog=verify.EXAMPLES)(verify.verify)
app.command("eval", epilog=evaluation.EXAMPLES)(evaluation.eval_command)
app.command("run", epilog=run.EXAMPLES)(run.run)
app.command("tasks", epilog=tasks.EXAMPLES)(tasks.tasks)
app.add_typer(bench.app, name="bench")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _launch.command_line[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=argv, prog_name="scoutq")
    except ScoutqError as err:
        if os.environ.get("SCOUTQ_DEBUG"):
            raise
        error(escape(str(err)))  # a path or tensor name may contain '[...]', which rich reads as markup
        sys.exit(1)
    except OSError as err:  # the machine's fault (full disk, read-only, I/O error), not a bug: one line
        if os.environ.get("SCOUTQ_DEBUG"):
            raise
        error(escape(os_error_line(err)))
        sys.exit(1)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)
    except click.exceptions.Exit as done:  # raised when typer runs non-standalone
        sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
