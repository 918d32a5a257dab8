"""One writer per output: a lock file beside DST, taken atomically, released on exit.

Two `scoutq quantize` runs into one DST would interleave shards and journals into an output
that looks complete and is not. The lock is `.NAME.scoutq-lock` beside DST (beside, not inside:
DST may not exist yet, and a GGUF DST is a file). It is created with O_CREAT | O_EXCL, so of
two runs starting at once exactly one wins, and holds the owner's pid, host and command.

A lock whose owner is gone (killed, or the machine rebooted) is stale: on the same host a pid
that no longer exists is detected and the lock taken over. A lock from another host (a shared
file system) cannot be checked from here and is refused with the owner named, so the user
decides.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scoutq.errors import ScoutqError


def lock_path(target: Path) -> Path:
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.scoutq-lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')} since {started} ({owner.get('command', '?')})"


@contextmanager
def output_lock(target: Path, command: str | None = None) -> Iterator[Path]:
    """Hold the lock on `target` for the block; refuse at once if a live process holds it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "command": command or " ".join(["scoutq", *sys.argv[1:]])}
    for _ in range(3):  # create; or find a stale lock, remove it, create again
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:  # being written this instant, or garbage: look again shortly
                time.sleep(0.05)
                owner = _read(path)
            if owner is not None and owner.get("host") != me["host"]:
                raise ScoutqError(f"{target}: is being written by {_describe(owner)}, another host; if that run is "
                                  f"gone, delete {path}") from None
            if owner is not None and isinstance(owner.get("pid"), int) and _alive(owner["pid"]):
                raise ScoutqError(f"{target}: is being written by {_describe(owner)}; wait for it to finish or stop "
                                  "it, then run again") from None
            path.unlink(missing_ok=True)  # its owner is dead (or the file is unreadable): take over
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise ScoutqError(f"{target}: could not take the lock {path} (another run keeps taking it)")
    try:
        yield path
    finally:
        if (_read(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
