"""Validation overlays: a Lightning callback that draws the same few validation images' predictions every epoch.

The images are the first ``num_images`` of the (unshuffled) validation loader on rank 0, so epochs compare like for
like; the task draws them (``render_predictions`` of the task contract, ``tasks/base.py``). Pictures go to
``<run>/visualizations/epoch<E>/val_<i>.png`` and to the active loggers: wandb (``WandbLogger.log_image``),
TensorBoard (``experiment.add_image``); with only the CSV logger, files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from core.files import write_atomically
from tasks.base import StrataTask

__all__ = ["ValidationOverlays", "log_images"]


def log_images(trainer: L.Trainer, key: str, images: list[Image.Image]) -> None:
    """Send pictures to the trainer's wandb and TensorBoard loggers (other loggers are skipped)."""
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=arrays, step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            for i, array in enumerate(arrays):
                logger.experiment.add_image(f"{key}/{i}", array, trainer.global_step, dataformats="HWC")


class ValidationOverlays(L.Callback):
    """Draws the predictions on the first ``num_images`` validation images every ``every_n_epochs`` epochs.

    Args:
        run_dir: the run directory; files go to ``<run_dir>/visualizations/epoch<E>/``.
        num_images: images per validation (0 disables the callback).
        every_n_epochs: draw on epochs divisible by this.
    """

    def __init__(self, run_dir: str | Path, num_images: int = 4, every_n_epochs: int = 1) -> None:
        if num_images < 0 or every_n_epochs < 1:
            raise ValueError(f"num_images={num_images} must be >= 0 and every_n_epochs={every_n_epochs} >= 1")
        self.run_dir = Path(run_dir)
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self._pictures: list[Image.Image] = []
        self._seen = 0

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            self.num_images > 0
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and trainer.current_epoch % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pictures, self._seen = [], 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: StrataTask,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or self._seen >= self.num_images or not self._active(trainer) or len(batch[0]) == 0:
            return  # NOTE: an empty batch is one whose images were all excluded (data.eval_undecodable exclude)
        limit = self.num_images - self._seen
        self._seen += min(limit, len(batch[0]))
        self._pictures += pl_module.render_predictions(batch, limit)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._pictures:
            return
        folder = self.run_dir / "visualizations" / f"epoch{trainer.current_epoch:03d}"
        for i, picture in enumerate(self._pictures):
            write_atomically(folder / f"val_{i}.png", lambda f, picture=picture: picture.save(f, format="PNG"))
        log_images(trainer, "val/predictions", self._pictures)
        self._pictures = []
