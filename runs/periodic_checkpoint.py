"""The mid-epoch ``last.ckpt``, written every N training steps, and after every validation instead of before it.

A ``last.ckpt`` written at the step a validation follows would, resumed after a kill in that validation, skip it:
Lightning counts the validation of a checkpoint saved at a training batch's end as done (reproduced: epoch 0's
metrics relabelled and its best candidate lost). So the save at a step a validation follows, due or not, comes at
the validation's end, and a kill before it resumes from the previous save. (The best-checkpoint callback writes
``last.ckpt`` at a validation's end only when the score improved: this save keeps ``last.ckpt`` at the epoch's
end, and a finished run's ``last.ckpt`` at its last step.)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["PeriodicLastCheckpoint"]


class PeriodicLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=N)`` in the run directory, plus a save
    after every validation in place of one at the step it follows (see the module docstring).

    Args:
        dirpath: The run directory.
        every_n_train_steps: Save every this many optimizer steps.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self._save_after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        # NOTE: Lightning's own test for "a validation follows this step", with its data fetcher
        if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._save_after_validation = not self._should_skip_saving_checkpoint(trainer)
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._save_after_validation and not trainer.sanity_checking:
            self._save_after_validation = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_validation_end(trainer, pl_module)
