"""Typed errors that the CLI turns into one clear line and exit code 1.

Every error raised for bad *input* (a file, a tensor, a config value, a recipe) is a
`ScoutqError`; an OSError (a full disk, a read-only or vanished file, an I/O error) is the
machine's fault, not a bug, and also becomes one line (`os_error_line`). Anything else
escaping the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class ScoutqError(Exception):
    """A problem with the user's input; its message is shown as is, on one line."""


class CheckpointError(ScoutqError):
    """A checkpoint directory, index, shard or tensor that cannot be used."""


class ConfigError(ScoutqError):
    """A config.json value scoutq cannot interpret."""


def one_line(err: BaseException) -> str:
    """An exception as one line (the CLI prints ScoutqError messages on a single line), at most 300 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# What the user can do about an OS error, by errno. Finished shards (and a GGUF export's finished
# tensors) are journaled, so after any of these the same command resumes where it stopped.
_REMEDIES = {
    errno.ENOSPC: "free space there and run the same command again: finished work is kept and the run resumes",
    errno.EDQUOT: "the disk quota is used up; free some and run the same command again: the run resumes",
    errno.EROFS: "the file system is read-only; choose another --out (or remount it) and run again",
    errno.EACCES: "permission denied; fix the permissions or choose another path",
    errno.EPERM: "operation not permitted; fix the permissions or choose another path",
    errno.EIO: "the disk or network file system reported an I/O error; check it, then run the same command again",
    errno.ENOENT: "it is gone (deleted while scoutq ran?); restore it and run the same command again",
}


def os_error_line(err: OSError, doing: str | None = None) -> str:
    """An OSError as one line: the file, what happened (with the errno name), and what to do."""
    name = errno.errorcode.get(err.errno or 0, "")
    what = err.strerror or os.strerror(err.errno) if err.errno else one_line(err)
    where = err.filename if err.filename is not None else "a file"
    line = f"{where}: {what}{f' ({name})' if name else ''}"
    if doing:
        line += f" while {doing}"
    remedy = _REMEDIES.get(err.errno or 0)
    return f"{line}; {remedy}" if remedy else line


def with_filename(err: OSError, path: os.PathLike[str] | str) -> OSError:
    """The same error, naming `path` (a write or pread on an open handle names no file)."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror, os.fspath(path))
