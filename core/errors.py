"""Errors the user must fix, printed by ``train.py`` as one line naming the file or field and the fix."""

from __future__ import annotations

import re
from typing import ClassVar

__all__ = ["CheckpointError", "ConfigError", "DataError", "DiskFullError", "TrainingHealthError", "UserError"]

# NOTE: torch re-raises a worker's exception as exc_type(f"Caught {name} {where}.\nOriginal {traceback}")
_RERAISED = re.compile(r"Caught \w+ in (DataLoader worker process \d+|pin memory thread[^.]*)\.\nOriginal Traceback")


def _original_message(message: str) -> str:
    """The message of the exception a DataLoader worker raised, when ``message`` is torch's re-raised form of it."""
    if not _RERAISED.match(message):
        return message
    last = message.rstrip().rsplit("\n", 1)[-1]  # NOTE: "core.errors.DataError: <the one-line message>"
    head, sep, original = last.partition(": ")
    return original if sep and re.fullmatch(r"[\w.]+", head) else message


class UserError(ValueError):
    """Base of the errors ``train.py`` reports as one line (exit code 2) instead of a traceback.

    The most recent one is remembered because jsonargparse re-raises errors from class instantiation as a new
    ``ValueError`` whose text embeds the original message. An error raised in a DataLoader worker comes back to the
    main process as a new instance whose text is a traceback; that instance keeps the original one-line message.
    """

    last: ClassVar[UserError | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(_original_message(message))
        UserError.last = self


class DataError(UserError):
    """A dataset problem: a missing folder or file, an empty class, inconsistent splits."""


class ConfigError(UserError):
    """A config value that cannot work: an unknown model name, a metric that is never logged."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, unsafe to unpickle, or of another model."""


class DiskFullError(UserError):
    """A write that the filesystem refused for space (``ENOSPC``, ``EDQUOT``, ``EFBIG``): the file, the space left."""


class TrainingHealthError(UserError):
    """Training cannot go on: too many non-finite losses or non-finite weights."""
