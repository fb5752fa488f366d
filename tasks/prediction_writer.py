"""Writes ``predict`` results into the run directory: ``predictions.csv`` (classification), ``predictions_coco.json``
(detection, COCO results format), ``predictions/<name>.png`` (segmentation label maps)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from .coco_evaluation import CocoEvaluator

__all__ = ["ClassificationPredictionWriter", "CocoPredictionWriter", "SegmentationPredictionWriter"]


class ClassificationPredictionWriter(BasePredictionWriter):
    """One CSV row per image: its path (when the dataset has ``samples``), label, and the top-5 classes with scores.

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
        pl_module: L.LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        dataset = trainer.predict_dataloaders.dataset if trainer.predict_dataloaders is not None else None
        samples = getattr(dataset, "samples", None)
        names = getattr(trainer.datamodule, "class_names", None)
        labels = batch[1].tolist()
        for row, (indices, probs) in enumerate(zip(prediction["indices"].tolist(), prediction["probs"].tolist())):
            index = batch_indices[row] if batch_indices is not None else None
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
                ],
            )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CocoPredictionWriter(BasePredictionWriter):
    """Collects the detection task's COCO result records and writes one ``predictions_coco.json`` (rank 0).

    The file is a COCO results list (original category ids, ``xywh`` boxes, scores, RLE masks) that
    ``COCO.loadRes`` and the official evaluator accept; under DDP every rank's records are gathered first.
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.run_dir = Path(run_dir)
        self._results = CocoEvaluator("unused.json")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._results.reset()

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._results.update(prediction["records"], prediction["image_ids"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._results.gather()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._results.write_results(self.run_dir / "predictions_coco.json")


class SegmentationPredictionWriter(BasePredictionWriter):
    """One PNG label map per image in ``predictions/``, in ADE20K's label space: predicted class index + 1.

    Files are written under a temporary name and renamed, so a killed run never leaves a truncated PNG.
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(run_dir) / "predictions"

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from PIL import Image

        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pred, name in zip(prediction["preds"], prediction["names"]):
            if int(pred.max()) >= 255:
                raise ValueError(f"{pred.max()} classes do not fit an 8-bit PNG label map")
            target = self.out_dir / f"{name}.png"
            tmp = target.with_name(f".{target.name}.tmp")
            Image.fromarray((pred.to(torch.uint8) + 1).numpy(), mode="L").save(tmp, format="PNG")
            tmp.replace(target)
