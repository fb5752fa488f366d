"""Validation overlays: a Lightning callback that draws the same few validation images' predictions every epoch.

The images are the first ``num_images`` of the (unshuffled) validation loader on rank 0, so epochs compare like for
like. Pictures go to ``<run>/visualizations/epoch<E>/val_<i>.png`` and to the active loggers: wandb
(``WandbLogger.log_image``), TensorBoard (``experiment.add_image``); with only the CSV logger, files only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from .overlays import render_classification, render_detection, render_segmentation, to_uint8_image

__all__ = ["ValidationOverlays", "log_images", "render_validation_batch"]


def _norm(datamodule: Any) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    hp = getattr(datamodule, "hparams", {})
    return hp.get("mean"), hp.get("std")


def render_validation_batch(pl_module: L.LightningModule, batch: Any, datamodule: Any, limit: int) -> list[Image.Image]:
    """Overlays of the first ``limit`` images of a validation batch, predicted by ``pl_module`` (no grad).

    Classification: one strip of tiles with predicted and true names; detection: prediction | ground truth with
    boxes and masks; segmentation: image | ground truth | prediction label maps.
    """
    from ..classification import ClassificationTask
    from ..detection import DetectionTask
    from ..segmentation import SegmentationTask

    names = getattr(datamodule, "class_names", None)
    mean, std = _norm(datamodule)
    if limit <= 0:
        return []
    with torch.no_grad():
        if isinstance(pl_module, ClassificationTask):
            images, targets = batch[0][:limit], batch[1][:limit]
            probs = pl_module(images).softmax(-1)
            tiles = [to_uint8_image(image, mean, std) for image in images]
            return [render_classification(tiles, probs, targets.tolist(), names)]
        if isinstance(pl_module, DetectionTask):
            images, targets = list(batch[0][:limit]), list(batch[1][:limit])
            detections = pl_module(images)
            return [
                render_detection(to_uint8_image(image), det, target, names)
                for image, det, target in zip(images, detections, targets)
            ]
        if isinstance(pl_module, SegmentationTask):
            images, masks = batch[0][:limit], batch[1][:limit]
            out = []
            for image, target in zip(images, masks):
                size = tuple(target.shape[-2:])
                probs = F.interpolate(pl_module(image[None]), size=size, mode="bilinear", align_corners=False)
                shown = Image.fromarray(to_uint8_image(image, mean, std)).resize(size[::-1], Image.BILINEAR)
                out.append(
                    render_segmentation(
                        np.asarray(shown),
                        probs.argmax(1)[0].cpu(),
                        target.cpu(),
                        names,
                        num_classes=pl_module.hparams.num_classes,
                        ignore_index=pl_module.hparams.ignore_index,
                    )
                )
            return out
    return []


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
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or self._seen >= self.num_images or not self._active(trainer) or len(batch[0]) == 0:
            return  # NOTE: an empty batch is one whose images were all excluded (data.eval_undecodable exclude)
        limit = self.num_images - self._seen
        self._seen += min(limit, len(batch[0]))
        self._pictures += render_validation_batch(pl_module, batch, trainer.datamodule, limit)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._pictures:
            return
        folder = self.run_dir / "visualizations" / f"epoch{trainer.current_epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(self._pictures):
            picture.save(folder / f"val_{i}.png")
        log_images(trainer, "val/predictions", self._pictures)
        self._pictures = []
