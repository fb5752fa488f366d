"""Loggers chosen in the config (wandb, TensorBoard, CSV), pointed at the run directory.

- wandb: logs under ``<run>/wandb``; runs offline unless credentials exist (``WANDB_API_KEY``, a ``~/.netrc`` entry
  for api.wandb.ai, or an explicit ``WANDB_MODE``), so it never prompts and never waits on a network it cannot reach;
  the run id is kept in ``<run>/wandb_run_id`` and reused, so a resumed run continues the same wandb run. wandb reads
  the API key from the environment; nothing here copies it into a config, log or checkpoint.
- TensorBoard: event files under ``<run>/tensorboard``.
- CSV: ``train.py`` always adds one (``<run>/metrics.csv``).

``AppendingCSVLogger``: ``metrics.csv`` that survives a resume (Lightning's CSV writer deletes an existing file when it
starts).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from core.errors import DiskFullError
from core.files import disk_full_errors, write_text_atomically

__all__ = ["WANDB_ID_FILE", "AppendingCSVLogger", "has_wandb_credentials", "point_loggers_at_run", "wandb_run_id"]

WANDB_ID_FILE = "wandb_run_id"
_WANDB = "WandbLogger"
_TENSORBOARD = "TensorBoardLogger"

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    """True when wandb can log in without asking: an API key in the environment or in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of ``run_dir``: read from ``run_dir/wandb_run_id``, or created and written there."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, run_id + "\n")
    return run_id


def _class_name(config: Any) -> str:
    class_path = config.get("class_path", "") if hasattr(config, "get") else ""
    return str(class_path).rsplit(".", 1)[-1]


def point_loggers_at_run(logger_config: Any, run_dir: Path, run_name: str, *, write_ids: bool) -> None:
    """Edit the config's ``trainer.logger`` entries (before instantiation) so they write into ``run_dir``.

    Args:
        logger_config: ``trainer.logger`` of the parsed config: a logger's ``class_path``/``init_args`` namespace, a
            list of them, or a bool / None (left alone).
        run_dir: The run directory.
        run_name: The run name (wandb's display name unless the config sets one).
        write_ids: Create ``run_dir/wandb_run_id`` if missing (rank 0 only: other ranks' loggers do not log).
    """
    entries = logger_config if isinstance(logger_config, list) else [logger_config]
    for entry in entries:
        name = _class_name(entry)
        if name not in (_WANDB, _TENSORBOARD):
            continue
        if entry.get("init_args") is None:
            entry["init_args"] = type(entry)()
        init_args = entry["init_args"]
        if name == _TENSORBOARD:
            init_args["save_dir"] = str(run_dir)
            init_args["name"] = "tensorboard"
            init_args["version"] = ""
            continue
        init_args["save_dir"] = str(run_dir)
        if not init_args.get("name"):
            init_args["name"] = run_name
        if write_ids or (run_dir / WANDB_ID_FILE).is_file():
            init_args["id"] = wandb_run_id(run_dir)
        init_args["resume"] = "allow"
        if not os.environ.get("WANDB_MODE") and not has_wandb_credentials():
            init_args["offline"] = True
            os.environ["WANDB_MODE"] = "offline"  # NOTE: child DDP processes inherit it


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` and appends to it, starting from its header's columns.

    A save that fails (a full disk is a ``DiskFullError`` naming the file) leaves ``metrics.csv`` as it was: the bytes
    it appended are cut off again, a new header is written atomically, and the unsaved rows wait for the next save.
    """

    _complete_size: int | None = None

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(set(header))

    def save(self) -> None:
        """Append the rows logged since the last save to ``metrics.csv`` (all of them, or none)."""
        path = self.metrics_file_path
        self._complete_size = os.path.getsize(path) if os.path.isfile(path) else None
        try:
            with disk_full_errors(path):
                super().save()
        except BaseException:
            self._restore_complete_file()
            raise

    def _restore_complete_file(self) -> None:
        path = self.metrics_file_path
        with contextlib.suppress(OSError):
            if self._complete_size is None:
                os.remove(path)
            elif os.path.getsize(path) > self._complete_size:
                os.truncate(path, self._complete_size)
        self.metrics_keys = []
        self._check_log_dir_exists()  # NOTE: the columns of the header on disk, which the next save extends

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomically(self.metrics_file_path, text.getvalue())
        self._complete_size = os.path.getsize(self.metrics_file_path)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps the rows of earlier attempts of the same run.

    A resumed ``fit`` appends its rows (new columns rewrite the header, as Lightning's writer does), so the file holds
    the whole history. Rows that an interrupted attempt logged after its last checkpoint stay in the file; the resumed
    attempt logs those steps again.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Save the last rows; after a failed run (``status`` ``"failed"``) a full disk is logged, not raised, so that
        the run's own error (often the same full disk, met by a checkpoint) is the one reported."""
        try:
            super().finalize(status)
        except DiskFullError as error:
            if status != "failed":
                raise
            log.warning("%s", error)
