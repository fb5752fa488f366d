"""Replacing files so that a reader, a crash or a kill never leaves a partial one in their place.

Every file Strata replaces (checkpoints, ``summary.json``, exported weights, logger ids, curves, prediction files)
goes through :func:`write_atomically` or :func:`move_into_place`: the bytes go to a temporary file in the same
folder, are flushed and ``fsync``'ed, and ``os.replace`` (atomic on POSIX filesystems) puts them in place; the folder
is ``fsync``'ed too so the rename survives a power loss. A failure while writing (disk full, an exception) removes
the temporary file and leaves the previous file untouched; a SIGKILL can leave the temporary ``.<name>.tmp`` behind,
never a partial ``<name>``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["move_into_place", "temporary_path", "write_atomically", "write_text_atomically"]


def temporary_path(path: str | Path) -> Path:
    """The temporary sibling a write of ``path`` goes through: ``.<name>.tmp`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # NOTE: some filesystems (and Windows) cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def move_into_place(staged: str | Path, path: str | Path) -> Path:
    """``fsync`` the complete file ``staged`` and rename it onto ``path`` (same filesystem); returns ``path``."""
    staged, path = Path(staged), Path(path)
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, path)
    _fsync_folder(path.parent)
    return path


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write(file)`` writes into a binary file object; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8); returns ``path``."""
    return write_atomically(path, lambda f: f.write(text.encode("utf-8")))
