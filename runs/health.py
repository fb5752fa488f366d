"""Run health: undecodable training samples are bounded, fp16 overflow is counted, non-finite weights are never saved.

``RunHealth`` is a callback (added by ``train.py``) that sums the training datasets' skip counters over processes
and stops the run when more than ``data.max_skipped_fraction`` of the training samples failed to decode, counts the
steps the fp16 ``GradScaler`` skipped for overflow, refuses to write a checkpoint whose weights are not finite, and
hands its figures to ``summary.json`` (``skipped_samples``, ``nonfinite_steps``, ``overflow_steps``,
``excluded_eval_images``). Non-finite losses are the task's business (``tasks/nonfinite.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as L
import torch

from core.errors import DataError, TrainingHealthError
from datamodules.base import StrataDataModule
from tasks.base import StrataTask
from tasks.nonfinite import last_checkpoint, sum_over_processes

__all__ = ["RunHealth", "health_summary", "skip_counts"]

logger = logging.getLogger(__name__)

_CHECK_EVERY_N_BATCHES = 50


def skip_counts(datamodule: StrataDataModule | None) -> tuple[int, int, int]:
    """``(requested, skipped, dataset size)`` summed over the datamodule's training sets (evaluation sets never
    replace a sample)."""
    counters = datamodule.training_skip_counters() if datamodule is not None else []
    requested = sum(counter.requested for counter, _ in counters)
    skipped = sum(counter.skipped for counter, _ in counters)
    return requested, skipped, sum(size for _, size in counters)


class RunHealth(L.Callback):
    """Bounds undecodable samples, counts fp16 overflow steps, keeps non-finite weights out of checkpoints.

    The skipped fraction is ``skipped / max(requested, dataset size)`` over all processes, for the training samples
    only (an undecodable evaluation image stops the run or is excluded from the metric, ``data.eval_undecodable``):
    measured against at least one pass over the data, a few bad files early in the first epoch do not stop a run
    whose dataset is within the limit. It is checked every 50 training batches and at the end of every
    training and validation epoch, on all ranks at once.
    """

    def __init__(self) -> None:
        self.overflow_steps = 0
        self.summary: dict[str, int] = {}
        self._scale: float | None = None

    def _check_skipped(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, int]:
        datamodule: StrataDataModule | None = trainer.datamodule  # NOTE: None when fit was given bare loaders
        requested, skipped, size = skip_counts(datamodule)
        requested, skipped = (int(v) for v in sum_over_processes(trainer, [requested, skipped], pl_module.device))
        limit = datamodule.max_skipped_fraction if datamodule is not None else 1.0
        if skipped > limit * max(requested, size):
            raise DataError(
                f"training stopped: {skipped} of {requested} samples failed to decode ({skipped / requested:.2%}), "
                f"more than data.max_skipped_fraction={limit}: the 'skipped sample' warnings name the files; fix or "
                "remove them, or raise --data.init_args.max_skipped_fraction"
            )
        return requested, skipped

    @staticmethod
    def _scaler(trainer: L.Trainer) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scaler = self._scaler(trainer)
        self._scale = float(scaler.get_scale()) if scaler is not None else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        scaler = self._scaler(trainer)
        if scaler is not None and self._scale is not None:
            scale = float(scaler.get_scale())
            if scale < self._scale:  # NOTE: the GradScaler found inf/NaN gradients, skipped the step, lowered the scale
                self.overflow_steps += 1
                if self.overflow_steps in (1, 10, 100, 1000):
                    logger.warning(
                        f"fp16 gradient overflow at step {trainer.global_step}: the GradScaler skipped the step and "
                        f"lowered the loss scale to {scale:g} ({self.overflow_steps} overflow steps so far)"
                    )
                pl_module.log("train/overflow_steps", float(self.overflow_steps), on_step=True, batch_size=1)
            self._scale = None
        if batch_idx % _CHECK_EVERY_N_BATCHES == 0:
            self._check_skipped(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_skipped(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_skipped(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [name for name, p in pl_module.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise TrainingHealthError(
                f"training stopped before saving a checkpoint: {len(bad)} parameters are not finite ({bad[0]}, ...) "
                f"at step {trainer.global_step}; {last_checkpoint(trainer)}: lower the learning rate or prefer bf16"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: StrataTask) -> None:
        _, skipped = self._check_skipped(trainer, pl_module)
        self.summary = {
            "skipped_samples": skipped,
            "nonfinite_steps": pl_module.nonfinite_guard.count,
            "overflow_steps": self.overflow_steps,
        }


def health_summary(trainer: L.Trainer, pl_module: StrataTask) -> dict[str, int]:
    """The ``summary.json`` fields: ``RunHealth``'s process-summed figures (else this process's own counts) and
    ``excluded_eval_images``, the images the last evaluation left out of its metric (summed over processes)."""
    excluded = pl_module.excluded_images.last
    for callback in trainer.callbacks:
        if isinstance(callback, RunHealth) and callback.summary:
            return {**callback.summary, "excluded_eval_images": excluded}
    return {
        "skipped_samples": skip_counts(trainer.datamodule)[1],
        "nonfinite_steps": pl_module.nonfinite_guard.count,
        "overflow_steps": 0,
        "excluded_eval_images": excluded,
    }
