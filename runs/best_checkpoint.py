"""``best.ckpt`` and the state resumed from agree on the best score after any kill.

At the end of a validation Lightning's ``ModelCheckpoint`` writes ``best.ckpt`` and then ``last.ckpt``. A kill
between the two writes leaves ``best.ckpt`` with the new weights while ``last.ckpt`` (the state resumed from)
records the previous best score; a rerun whose validation scores lower (any non-deterministic run) keeps the file
but reports the old score, so ``summary.json`` would not describe the exported weights. ``BestCheckpointRecord``
makes the best score those stored in ``best.ckpt`` itself (the ``ModelCheckpoint`` state in the file, saved after
its score was recorded), and ``summary.json`` reports the file's score, step and epoch (``read_best_record``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from core.checkpoint_files import load_checkpoint_file

__all__ = ["BestCheckpointRecord", "BestRecord", "read_best_record"]

log = logging.getLogger(__name__)


class BestRecord(dict):
    """``{"score": float, "step": int, "epoch": int, "monitor": str}`` as stored in a ``best.ckpt``."""


def read_best_record(path: str | Path, monitor: str) -> BestRecord | None:
    """The score, step and epoch ``best.ckpt`` at ``path`` was saved for (``None`` when it holds no record for
    ``monitor``)."""
    checkpoint = load_checkpoint_file(path, mmap=True)
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor") == monitor:
            score = state.get("best_model_score")
            if score is None:
                return None
            value = float(score.item() if hasattr(score, "item") else score)
            return BestRecord(
                score=value, step=int(checkpoint["global_step"]), epoch=int(checkpoint["epoch"]), monitor=monitor
            )
    return None


def _best_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    callback = trainer.checkpoint_callback
    return callback if isinstance(callback, ModelCheckpoint) and callback.monitor else None


class BestCheckpointRecord(L.Callback):
    """On resume, makes the best-checkpoint callback's record what ``best.ckpt`` holds (see the module docstring).

    Args:
        run_dir: The run directory holding ``best.ckpt``.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.record: BestRecord | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback, path = _best_callback(trainer), self.run_dir / "best.ckpt"
        if callback is None or not path.is_file():
            return
        record = read_best_record(path, callback.monitor)
        if record is None:
            return
        recorded = callback.best_model_score
        if recorded is None or float(recorded) != record["score"]:
            callback.best_model_score = torch.tensor(record["score"])
            callback.best_model_path = callback.kth_best_model_path = str(path)
            callback.best_k_models = {str(path): torch.tensor(record["score"])}
            callback.kth_value = torch.tensor(record["score"])
            if trainer.is_global_zero:
                print(
                    f"{path} (step {record['step']}, {record['monitor']} {record['score']:.4f}) was written after "
                    "the checkpoint resumed from: it stays the best so far",
                    flush=True,
                )
