"""The run directory's summary files: throughput, ``summary.json``, the timm export, and the closing screen."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from core.checkpoint_files import load_checkpoint_file
from core.files import write_text_atomically
from datamodules.base import StrataDataModule
from tasks.base import StrataTask
from visualization.curves import plot_training_curves

from .best_checkpoint import read_best_record
from .export import export_for_timm
from .health import health_summary

__all__ = ["RunArtifacts"]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunArtifacts(L.Callback):
    """Measures training throughput and, when ``fit`` ends, writes ``summary.json`` and exports the best weights.

    Throughput counts training images over the wall time of the training loop (data loading included, validation
    excluded), summed over processes.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.train_images = 0
        self.train_seconds = 0.0
        self._mark: float | None = None
        self._fit_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._mark is not None:
            self._mark = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self.train_seconds += now - self._mark
        self._mark = now
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.train_images += len(images) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: StrataTask) -> None:
        self._finish(trainer, pl_module)

    @rank_zero_only
    def _finish(self, trainer: L.Trainer, pl_module: StrataTask) -> None:
        checkpoint = trainer.checkpoint_callback
        best_path = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
        exported = None
        if best_path and os.path.isfile(best_path):
            exported = self._export_best(trainer, pl_module, best_path)
        # NOTE: the score stored in best.ckpt itself, which describes the exported weights whatever a kill did
        record = read_best_record(best_path, pl_module.monitor) if best_path and os.path.isfile(best_path) else None
        best = record["score"] if record else None
        datamodule: StrataDataModule = trainer.datamodule
        summary = {
            "task": type(pl_module).__name__,
            "backbone": pl_module.hparams.get("backbone"),
            "data": datamodule.describe(),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "monitor": pl_module.monitor,
            "best_metric": _plain(best),
            "best_step": record["step"] if record else None,
            "best_epoch": record["epoch"] if record else None,
            "best_checkpoint": best_path or None,
            "final_metrics": {k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())},
            "train_images_per_sec": round(self.train_images / self.train_seconds, 2) if self.train_seconds else None,
            "wall_seconds": round(time.perf_counter() - self._fit_start, 2),
            **health_summary(trainer, pl_module),  # skipped_samples, nonfinite/overflow_steps, excluded_eval_images
        }
        write_text_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_training_curves(self.run_dir)
        self._print_screen(summary, exported)

    def _export_best(self, trainer: L.Trainer, pl_module: StrataTask, best_path: str) -> Path:
        """Load ``best.ckpt`` into a copy of the task on CPU and export its weights."""
        state = load_checkpoint_file(best_path)["state_dict"]
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(state)
        try:
            datamodule: StrataDataModule = trainer.datamodule
            return export_for_timm(
                pl_module.export_module(),
                self.run_dir,
                data_config=datamodule.timm_data_config(),
                label_names=datamodule.class_names,
                model_args=pl_module.export_model_args(),
            )
        finally:
            pl_module.load_state_dict(current)

    def _print_screen(self, summary: dict[str, Any], exported: Path | None) -> None:
        best = summary["best_metric"]
        lines = [
            "",
            "=" * 72,
            f"Run finished: {self.run_dir}",
            f"  best {summary['monitor']}: {best:.4f}" if best is not None else "  best metric: (no validation ran)",
            f"  training: {summary['train_images_per_sec']} images/s, {summary['global_step']} steps, "
            f"{summary['wall_seconds']:.0f} s wall",
            f"  files: {', '.join(sorted(p.name for p in self.run_dir.iterdir() if not p.name.startswith('.')))}",
        ]
        if exported is not None:
            lines.append(f"  use it anywhere: timm.create_model('local-dir:{self.run_dir}', pretrained=True)")
        lines.append("=" * 72)
        print("\n".join(lines), flush=True)
