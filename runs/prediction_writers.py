"""Writes ``predict`` results into the run directory, one writer per task ``prediction_format``.

``predictions.csv`` (classification), ``predictions_coco.json`` (detection, COCO results format),
``predictions/<name>.png`` (segmentation label maps); detection and segmentation also draw their first
``max_overlays`` images (per process) to ``predictions/overlays/`` beside the ground truth. An image excluded because
it does not decode (``data.eval_undecodable: exclude``) gets no prediction. What a writer needs from the data (class
names, category ids, the normalisation) comes from the task's ``dataset_info``; every file is written atomically.

``predictions.csv`` is always valid UTF-8, whatever the file names: on Linux a name may be any bytes, which Python
holds as surrogate escapes (``b"caf\\xe9.jpg"`` is ``"caf\\udce9.jpg"``); such a cell is escaped (``csv_cell``) and
``path_from_csv`` maps it back to the exact file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from pycocotools import mask as mask_utils

from core.files import disk_full_errors, move_into_place, temporary_path, write_atomically, write_text_atomically
from datamodules.decode import excluded_samples
from datamodules.image_folder import ImageFolderDataset
from tasks.base import StrataTask
from tasks.coco_evaluation import gather_from_processes
from visualization.overlays import render_detection, render_segmentation, to_uint8_image

__all__ = [
    "ClassificationPredictionWriter",
    "CocoPredictionWriter",
    "SegmentationPredictionWriter",
    "csv_cell",
    "path_from_csv",
    "prediction_writer_for",
]

_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def _unescape(cell: str) -> bytes:
    return _ESCAPE.sub(lambda match: bytes([int(match[1], 16)]), cell.encode("utf-8"))


def csv_cell(text: str) -> str:
    """``text`` (a path, a class name) as a CSV cell that is valid UTF-8 and maps back exactly (``path_from_csv``).

    Text that is valid UTF-8 is written as is. Text that is not (a Linux file name of other bytes, held by Python as
    surrogate escapes), or that itself contains a backslash, ``x`` and two lowercase hex digits, is written as its
    bytes (``os.fsencode``) with each backslash as ``\\x5c`` and each byte that is not valid UTF-8 as ``\\xHH``
    (``backslashreplace``, lowercase hex): ``b"caf\\xe9.jpg"`` is written ``caf\\xe9.jpg``.
    """
    with contextlib.suppress(UnicodeEncodeError):
        if _ESCAPE.search(text.encode("utf-8")) is None:
            return text
    return os.fsencode(text).replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")


def path_from_csv(cell: str) -> str:
    """The path (or class name) a ``predictions.csv`` cell stands for: ``os.fsdecode`` of the cell's UTF-8 bytes with
    each ``\\xHH`` replaced by the byte ``HH`` (the inverse of ``csv_cell``)."""
    return os.fsdecode(_unescape(cell))


def _save_png(picture: Image.Image, target: Path) -> None:
    write_atomically(target, lambda f: picture.save(f, format="PNG"))


class ClassificationPredictionWriter(BasePredictionWriter):
    """One CSV row per image: its path (for a class-folder dataset), label, and the top-5 classes with scores.

    Columns: ``path`` (the image file; empty for a dataset that is not a class folder), ``label`` (its class index),
    ``top1`` and ``top1_name`` (the predicted class index and name), ``top5`` (the top-5 class indices, best first,
    space-separated) and ``top5_probs`` (their softmax probabilities, 4 decimals). The file is UTF-8. ``path`` and
    ``top1_name`` are ``csv_cell(text)``: the text as is when it is valid UTF-8; a file name that is not (Linux allows
    any bytes) is written as its bytes with ``\\xHH`` for each byte that does not decode and ``\\x5c`` for each
    backslash (``b"caf\\xe9.jpg"`` as ``caf\\xe9.jpg``), and so is a valid name that itself contains ``\\x`` and two
    lowercase hex digits. Read back: ``path_from_csv(cell)`` (``os.fsdecode`` of the cell's UTF-8 bytes with each
    ``\\xHH`` replaced by the byte ``HH``) is the exact file name.

    An image excluded because it does not decode (``data.eval_undecodable: exclude``) gets no row: the batch's rows
    are its sampler indices less the batch's ``ExcludedSamples``.

    Each process writes its own ``predictions.rank<R>.csv`` under DDP; a single process writes ``predictions.csv``.
    The rows go to the temporary ``.<name>.tmp`` and replace the file when ``predict`` ends (``core.files``): a run
    that fails (a full disk is a one-line ``DiskFullError``) leaves the previous file untouched.
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self._path: Path | None = None
        self._file = None
        self._writer = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.csv"
        self._path = self.run_dir / name
        with disk_full_errors(self._path):
            # NOTE: closed in on_predict_end (moved into place) or on_exception (removed)
            self._file = open(temporary_path(self._path), "w", encoding="utf-8", newline="")  # noqa: SIM115
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
        rows = []
        for row, (indices, probs) in enumerate(zip(prediction["indices"].tolist(), prediction["probs"].tolist())):
            index = kept[row] if kept is not None else None
            path = samples[index][0] if samples is not None and index is not None else ""
            top_name = names[indices[0]] if names is not None else ""
            rows.append(
                [
                    csv_cell(path),
                    labels[row],
                    indices[0],
                    csv_cell(top_name),
                    " ".join(map(str, indices)),
                    " ".join(f"{p:.4f}" for p in probs),
                ]
            )
        with disk_full_errors(self._path):
            self._writer.writerows(rows)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is None:
            return
        with disk_full_errors(self._path):
            self._file.close()
        self._file = None
        move_into_place(temporary_path(self._path), self._path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._file is None:
            return
        with contextlib.suppress(OSError):  # NOTE: the run already failed; a full disk refusing the last rows is moot
            self._file.close()
        self._file = None
        temporary_path(self._path).unlink(missing_ok=True)


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
