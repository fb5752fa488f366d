"""Writes ``predict`` results of the classification task to ``predictions.csv`` in the run directory."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["ClassificationPredictionWriter"]


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
