"""One process at a time per run directory and subcommand: a second ``fit`` on a running run's name stops at once.

Two runs with the same ``--name`` would share ``last.ckpt``, ``metrics.csv`` and the wandb run id: overlapping saves
and interleaved rows, and the second run resumes the first one's live checkpoint. ``RunLock`` takes an exclusive
``fcntl.flock`` on ``<out_dir>/.<name>.lock-<subcommand>`` (beside the run directory, which Lightning wants empty
when a run starts), held for the life of the process: the kernel releases it when the
process ends in any way (SIGKILL included), so a rerun after a crash never finds a stale lock. The file holds the
holder's pid, host and start time for the error message. Only the job's first process takes it
(``runs/process_rank.py``); ``fit`` and a ``validate`` of the same run may run side by side (they write different
files). On a filesystem without ``flock`` (some Lustre mounts) the lock is skipped with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, ClassVar

from core.errors import ConfigError

__all__ = ["RunLock"]

log = logging.getLogger(__name__)


class RunLock:
    """The exclusive lock of ``run_dir`` for ``subcommand`` (see the module docstring).

    Args:
        run_dir: The run directory (its parent is created if missing).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``: each has its own lock.
    """

    _held: ClassVar[list[RunLock]] = []

    def __init__(self, run_dir: str | Path, subcommand: str) -> None:
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock-{subcommand}"
        self.subcommand = subcommand
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``ConfigError`` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115  (held open for the life of the lock)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            raise ConfigError(
                f"run {self.run_dir} is already running {self.subcommand} ({holder}): wait for it to end, or pass "
                "another --name"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                file.close()
                raise
            log.warning("cannot lock %s (%s): a second run with this name would not be detected", self.path, error)
            file.close()
            return self
        file.seek(0)
        file.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        file.write(json.dumps(holder) + "\n")
        file.flush()
        self._file = file
        RunLock._held.append(self)
        return self

    def release(self) -> None:
        """Give the lock back (the end of the process does it too)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            RunLock._held.remove(self)

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds."""
        for lock in list(cls._held):
            lock.release()


def _describe(content: str) -> str:
    try:
        holder = json.loads(content)
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
