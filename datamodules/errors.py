"""Errors the user must fix, printed by ``train.py`` as one line naming the file or field and the fix."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ConfigError", "DataError", "UserError"]


class UserError(ValueError):
    """Base of the errors ``train.py`` reports as one line (exit code 2) instead of a traceback.

    The most recent one is remembered because jsonargparse re-raises errors from class instantiation as a new
    ``ValueError`` whose text embeds the original message.
    """

    last: ClassVar[UserError | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        UserError.last = self


class DataError(UserError):
    """A dataset problem: a missing folder or file, an empty class, inconsistent splits."""


class ConfigError(UserError):
    """A config value that cannot work: an unknown model name, a metric that is never logged."""
