"""Typed errors that the CLI turns into one clear line and exit code 1.

Every error raised for bad *input* (a file, a tensor, a config value, a recipe) is a
`ScoutqError`; anything else escaping the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


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
