"""`--nproc N`: start N ranks of the same command on this machine, as torchrun would, and watch them.

Each rank is `python -m scoutq <the same arguments>` with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), so a run under torchrun and a
run through --nproc execute the same code. Rank 0 prints as a plain run does; the other ranks'
output goes to a temporary file, shown only if that rank fails. When any rank exits with an
error or dies, the others are stopped and the run fails with one line naming that rank: the
output directory then holds only what rank 0 committed, which a rerun resumes from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from scoutq.cli._output import error
from scoutq.stream.processes import WORK_NOTE_ENV, free_port, rank_environment, read_work_note

POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10.0
SETTLE_SECONDS = 2.0  # how long the other ranks may take to fail on their own
command_line: list[str] = []  # the arguments `scoutq` was called with (set by cli.app.main)


def without_nproc(argv: list[str]) -> list[str]:
    """The command line with `--nproc N` / `--nproc=N` removed: what each rank runs."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch(argv: list[str], nproc: int) -> int:
    """Run `scoutq <argv>` as `nproc` ranks; returns the exit code for the whole run."""
    port = free_port()
    logs = [None] + [tempfile.TemporaryFile() for _ in range(1, nproc)]
    notes = tempfile.TemporaryDirectory(prefix="scoutq-ranks-")  # what each rank is working on
    ranks = []
    for rank in range(nproc):
        env = {**os.environ, **rank_environment(rank, nproc, port), WORK_NOTE_ENV: notes.name}
        quiet = logs[rank]
        ranks.append(subprocess.Popen([sys.executable, "-m", "scoutq", *argv], env=env,
                                      stdout=quiet if quiet else None, stderr=quiet if quiet else None))
    try:
        while True:
            codes = [process.poll() for process in ranks]
            failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                codes = _stop(ranks)
                return _report(codes, logs, notes.name)
            if all(code == 0 for code in codes):
                return 0
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in ranks:
            process.wait()
        return 130
    finally:
        for log in logs:
            if log is not None:
                log.close()
        notes.cleanup()


def _stop(ranks: list[subprocess.Popen]) -> list[int]:
    """Let the ranks that are failing too (a bad input fails on every rank) finish on their own for
    a moment, then stop the rest; returns every rank's exit code."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline and any(process.poll() is None for process in ranks):
        time.sleep(POLL_SECONDS)
    for process in ranks:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in ranks:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return [int(process.returncode) for process in ranks]


def _report(codes: list[int], logs: list, notes: str) -> int:
    """One line naming the rank that failed first in kind: a rank that died (with the modules it
    was quantizing, from its work note), else rank 0's own error line (already printed), else the
    first failed rank with its last line of output."""
    died = next((rank for rank, code in enumerate(codes) if code < 0 and code != -signal.SIGTERM), None)
    if died is not None:
        doing = read_work_note(notes, died)
        error(f"rank {died} died ({signal.Signals(-codes[died]).name}){' while ' + doing if doing else ''}; "
              "the other ranks were stopped. Run the same command again to resume")
        return 1
    if codes[0] > 0:
        return codes[0]
    rank = next(rank for rank, code in enumerate(codes) if code != 0)
    last = ""
    if logs[rank] is not None:
        logs[rank].seek(0)
        lines = [line.strip() for line in logs[rank].read().decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else ""
    doing = read_work_note(notes, rank)
    error(f"rank {rank} exited with code {codes[rank]}{' while ' + doing if doing else ''}"
          f"{': ' + last if last else ''}")
    return 1
