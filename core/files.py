"""Replacing files so that a reader, a crash or a kill never leaves a partial one in their place.

Every file Strata replaces (checkpoints, ``summary.json``, exported weights, logger ids, curves, prediction files)
goes through :func:`write_atomically` or :func:`move_into_place`: the bytes go to a temporary file in the same
folder, are flushed and ``fsync``'ed, and ``os.replace`` (atomic on POSIX filesystems) puts them in place; the folder
is ``fsync``'ed too so the rename survives a power loss. A failure while writing (disk full, any exception, a
``KeyboardInterrupt`` or ``SystemExit`` included) removes the temporary file and leaves the previous file untouched;
a SIGKILL can leave the temporary ``.<name>.tmp`` behind, never a partial ``<name>``. A write the filesystem refuses
for space (``ENOSPC``, ``EDQUOT``, ``EFBIG``, also when a library such as ``torch.save`` re-raises it as another
error) is a one-line ``DiskFullError`` naming the file, the space left on its filesystem and the fix
(:func:`disk_full_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import DiskFullError

__all__ = [
    "DISK_FULL_ERRNOS",
    "disk_full_errors",
    "explain_disk_full",
    "move_into_place",
    "temporary_path",
    "write_atomically",
    "write_text_atomically",
]

# NOTE: EDQUOT is a user's or group's quota, EFBIG a file-size limit (RLIMIT_FSIZE, the filesystem's maximum)
DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code)


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


def _disk_full_cause(error: BaseException) -> OSError | None:
    """The ``ENOSPC``/``EDQUOT``/``EFBIG`` error in the chain of ``error`` (``torch.save`` raises a ``RuntimeError``
    "unexpected pos" whose context is the ``OSError``), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _size(num_bytes: int) -> str:
    value, unit = float(num_bytes), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{num_bytes} B" if unit == "B" else f"{value:.1f} {unit}"


def _mount_point(folder: Path) -> Path:
    """The mount point of the filesystem holding ``folder`` (its nearest existing ancestor)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def explain_disk_full(path: str | Path, error: OSError) -> DiskFullError:
    """The one-line ``DiskFullError`` of a write of ``path`` that failed with ``error`` (``ENOSPC``, ``EDQUOT``,
    ``EFBIG``): the file, the reason, the free space on its filesystem (``shutil.disk_usage``) and the fix."""
    path = Path(path)
    mount = _mount_point(path.parent)
    try:
        free = f"{_size(shutil.disk_usage(mount).free)} free on {mount}"
    except OSError:
        free = f"free space on {mount} unknown"
    reason = os.strerror(error.errno) if error.errno is not None else str(error)
    return DiskFullError(
        f"cannot write {path}: {reason} ({free}); free space on {mount} or point --out_dir elsewhere; rerun the "
        "same command to resume from the last complete checkpoint"
    )


@contextlib.contextmanager
def disk_full_errors(path: str | Path) -> Iterator[None]:
    """Around code that writes ``path``: a write the filesystem refuses for space becomes ``explain_disk_full``'s
    ``DiskFullError``; any other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        cause = _disk_full_cause(error)
        if cause is None:
            raise
        raise explain_disk_full(path, cause) from None


def move_into_place(staged: str | Path, path: str | Path) -> Path:
    """``fsync`` the complete file ``staged`` and rename it onto ``path`` (same filesystem); returns ``path``.

    Raises:
        DiskFullError: the filesystem refused the ``fsync`` for space (``staged`` is left to its writer).
    """
    staged, path = Path(staged), Path(path)
    with disk_full_errors(path):
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(staged, path)
    _fsync_folder(path.parent)
    return path


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write(file)`` writes into a binary file object; returns ``path``.

    On any failure (``KeyboardInterrupt`` and ``SystemExit`` included) the temporary ``.<name>.tmp`` is removed and
    ``path`` keeps its previous content.

    Raises:
        DiskFullError: the filesystem refused the write for space (``ENOSPC``, ``EDQUOT``, ``EFBIG``).
    """
    path = Path(path)
    tmp = temporary_path(path)
    with disk_full_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # NOTE: never hide the write's own error behind the cleanup's
                tmp.unlink(missing_ok=True)
            raise
    _fsync_folder(path.parent)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8); returns ``path`` (``write_atomically``)."""
    return write_atomically(path, lambda f: f.write(text.encode("utf-8")))
