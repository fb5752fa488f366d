"""Writes ``predict`` results into the run directory, one writer per task ``prediction_format``.

``predictions.csv`` (classification), ``predictions_coco.json`` (detection, COCO results format),
``predictions/<name>.png`` (segmentation label maps); detection and segmentation also draw their first
``max_overlays`` images (per process) to ``predictions/overlays/`` beside the ground truth. An image excluded because
it does not decode (``data.eval_undecodable: exclude``) gets no prediction. What a writer needs from the data (class
names, category ids, the normalisation) comes from the task's ``dataset_info``; every file is written atomically.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from pycocotools import mask as mask_utils

from core.files import write_atomically, write_text_atomically
from datamodules.decode import excluded_samples
from datamodules.image_folder import ImageFolderDataset
from tasks.base import StrataTask
from tasks.coco_evaluation import gather_from_processes
from visualization.overlays import render_detection, render_segmentation, to_uint8_image

__all__ = [
    "ClassificationPredictionWriter",
    "CocoPredictionWriter",
    "SegmentationPredictionWriter",
    "prediction_writer_for",
]


def _save_png(picture: Image.Image, target: Path) -> None:
    write_atomically(target, lambda f: picture.save(f, format="PNG"))


class ClassificationPredictionWriter(BasePredictionWriter):
    """One CSV row per image: its path (for a class-folder dataset), label, and the top-5 classes with scores.

    An image excluded because it does not decode (``data.eval_undecodable: exclude``) gets no row: the batch's rows
    are its sampler indices less the batch's ``ExcludedSamples``.

    Each process writes its own ``predictions.rank<R>.csv`` under DDP; a single process writes ``predictions.csv``.
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self._file = None
        self._writer = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.csv"
        self._file = open(self.run_dir / name, "w", newline="")  # noqa: SIM115  (closed in on_predict_end)
        self._writer = csv.writer(self._file)
        self._writer.writerow(["path", "label", "top1", "top1_name", "top5", "top5_probs"])

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: StrataTask,
        prediction: dict[str, torch.Tensor],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        dataset = trainer.predict_dataloaders.dataset if trainer.predict_dataloaders is not None else None
        samples = dataset.samples if isinstance(dataset, ImageFolderDataset) else None
        names = pl_module.dataset_info.get("class_names")
        labels = batch[1].tolist()
        excluded = {sample.index for sample in excluded_samples(batch)}
        kept = [i for i in batch_indices if i not in excluded] if batch_indices is not None else None
        for row, (indices, probs) in enumerate(zip(prediction["indices"].tolist(), prediction["probs"].tolist())):
            index = kept[row] if kept is not None else None
            path = samples[index][0] if samples is not None and index is not None else ""
            top_name = names[indices[0]] if names is not None else ""
            self._writer.writerow(
                [
                    path,
                    labels[row],
                    indices[0],
                    top_name,
                    " ".join(map(str, indices)),
                    " ".join(f"{p:.4f}" for p in probs),
                ]
            )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CocoPredictionWriter(BasePredictionWriter):
    """Collects the detection task's COCO result records and writes one ``predictions_coco.json`` (rank 0).

    The file is a COCO results list (original category ids, ``xywh`` boxes, scores, RLE masks) that
    ``COCO.loadRes`` and the official evaluator accept; under DDP every rank's records are gathered first.
    The first ``max_overlays`` images are drawn to ``predictions/overlays/<image_id>.png`` (prediction | ground
    truth, at the original size).
    """

    def __init__(self, run_dir: str | Path, max_overlays: int = 16) -> None:
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self.max_overlays = max_overlays
        self._records: list[dict] = []
        self._overlays = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._records, self._overlays = [], 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: StrataTask,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._records.extend(prediction["records"])
        for image, target in zip(batch[0], batch[1]):  # NOTE: excluded images are not in the batch
            if self._overlays >= self.max_overlays:
                break
            self._overlays += 1
            records = [r for r in prediction["records"] if r["image_id"] == int(target["image_id"])]
            picture = _coco_overlay(image, target, records, pl_module.dataset_info)
            _save_png(picture, self.run_dir / "predictions" / "overlays" / f"{int(target['image_id'])}.png")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = [r for part in gather_from_processes(self._records) for r in part]
        if trainer.is_global_zero:
            write_text_atomically(self.run_dir / "predictions_coco.json", json.dumps(records))


def _coco_overlay(
    image: torch.Tensor, target: dict[str, Any], records: list[dict], dataset_info: dict[str, Any]
) -> Image.Image:
    """Prediction | ground truth at the original image size from COCO result records and the resized target."""
    height, width = (int(v) for v in target["orig_size"])
    shown = Image.fromarray(to_uint8_image(image)).resize((width, height), Image.BILINEAR)
    label_of = {int(c): i + 1 for i, c in enumerate(dataset_info["category_ids"])}
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)]
    pred = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([label_of[int(r["category_id"])] for r in records], dtype=torch.int64),
        "scores": torch.tensor([r["score"] for r in records], dtype=torch.float32),
    }
    if records and all("segmentation" in r for r in records):
        pred["masks"] = torch.from_numpy(np.stack([mask_utils.decode(r["segmentation"]) for r in records]))
    sy, sx = target["scale"]
    truth = {"boxes": target["boxes"] / torch.tensor([sx, sy, sx, sy]), "labels": target["labels"]}
    if "masks" in target and len(target["masks"]):
        masks = target["masks"][:, None].float()
        truth["masks"] = torch.nn.functional.interpolate(masks, size=(height, width), mode="nearest")[:, 0]
    return render_detection(np.asarray(shown), pred, truth, dataset_info.get("class_names"))


class SegmentationPredictionWriter(BasePredictionWriter):
    """One PNG label map per image in ``predictions/``, in ADE20K's label space: predicted class index + 1.

    The first ``max_overlays`` images are also drawn to ``predictions/overlays/<name>.png`` (image | ground truth |
    prediction, colour-coded with a legend of class names).
    """

    def __init__(self, run_dir: str | Path, max_overlays: int = 16) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(run_dir) / "predictions"
        self.max_overlays = max_overlays
        self._overlays = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._overlays = 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer | None,
        pl_module: StrataTask,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for pred, name in zip(prediction["preds"], prediction["names"]):
            if int(pred.max()) >= 255:
                raise ValueError(f"{pred.max()} classes do not fit an 8-bit PNG label map")
            label_map = Image.fromarray((pred.to(torch.uint8) + 1).numpy(), mode="L")
            _save_png(label_map, self.out_dir / f"{name}.png")
        if batch is None or trainer is None or self._overlays >= self.max_overlays:
            return  # NOTE: overlays need the batch's images; the label maps above never do
        images, masks = batch[0], batch[1]
        info = pl_module.dataset_info
        for i, (pred, name) in enumerate(zip(prediction["preds"], prediction["names"])):
            if self._overlays >= self.max_overlays:
                break
            self._overlays += 1
            size = tuple(pred.shape)
            shown = Image.fromarray(to_uint8_image(images[i], info.get("mean"), info.get("std")))
            truth = masks[i].cpu() if tuple(masks[i].shape[-2:]) == size else None
            picture = render_segmentation(
                np.asarray(shown.resize(size[::-1], Image.BILINEAR)),
                pred,
                truth,
                info.get("class_names"),
                num_classes=pl_module.hparams.get("num_classes"),
                ignore_index=pl_module.hparams.get("ignore_index", 255),
            )
            _save_png(picture, self.out_dir / "overlays" / f"{name}.png")


_WRITERS: dict[str, type[BasePredictionWriter]] = {
    "classification": ClassificationPredictionWriter,
    "coco": CocoPredictionWriter,
    "segmentation": SegmentationPredictionWriter,
}


def prediction_writer_for(task: StrataTask, run_dir: str | Path) -> BasePredictionWriter:
    """The writer of ``task.prediction_format`` (``tasks/base.py``), writing into ``run_dir``."""
    return _WRITERS[task.prediction_format](run_dir)
