"""Training health: non-finite losses skip their step, fp16 overflow is counted, undecodable samples are bounded.

Three pieces. ``NonFiniteLossGuard`` lives in every task's ``training_step``: a step whose loss is NaN or infinite on
any process is skipped on every process (its gradients are dropped before the optimizer step, so no weight or
optimizer state moves; ``global_step`` and the LR schedule still advance by one), the buffers its forward pass
touched (BatchNorm statistics) are restored, and after ``max_nonfinite_steps`` such steps the run stops with a
one-line ``TrainingHealthError``; since no bad step changes the weights, every checkpoint, ``last.ckpt`` included,
holds good weights. ``RunHealth`` is a callback (added by ``train.py``) that sums the training datasets' skip
counters over processes and stops the run when more than ``data.max_skipped_fraction`` of the training samples failed
to decode, counts the steps the fp16 ``GradScaler`` skipped for overflow, refuses to write a checkpoint whose weights
are not finite, and hands its figures to ``summary.json`` (``skipped_samples``, ``nonfinite_steps``,
``overflow_steps``). ``ExcludedImages`` lives in every task's evaluation: it counts the val/test images left out of
the metric because they do not decode (``data.eval_undecodable: exclude``; evaluation never substitutes a sample),
summed over processes, logged as ``{stage}/excluded_images`` and written to ``summary.json`` as
``excluded_eval_images``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.decode import SkipCounter, excluded_samples
from datamodules.errors import DataError, UserError

__all__ = [
    "ExcludedImages",
    "NonFiniteLossGuard",
    "RunHealth",
    "TrainingHealthError",
    "health_summary",
    "skip_counts",
]

logger = logging.getLogger(__name__)

_CHECK_EVERY_N_BATCHES = 50


class TrainingHealthError(UserError):
    """Training cannot go on: too many non-finite losses or non-finite weights."""


def _sum_over_processes(trainer: L.Trainer | None, values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    if trainer is not None and trainer.world_size > 1:
        tensor = trainer.strategy.reduce(tensor, reduce_op="sum")
    return tensor.tolist()


def _last_checkpoint(trainer: L.Trainer) -> str:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return f"the last good checkpoint is {path}" if path else "no checkpoint had been written yet"


class NonFiniteLossGuard:
    """Skips training steps whose loss is not finite; stops the run after ``max_nonfinite_steps`` of them.

    Use in ``training_step``: ``guard.before_forward(self)`` first, then ``loss = guard(self, loss)``, returning
    ``loss`` right away (unlogged) when ``guard.skipping``; and ``guard.drop_skipped_step(self)`` in
    ``on_before_optimizer_step``. The decision is taken over all processes (one ``all_reduce`` of a flag), so DDP
    ranks skip the same steps. A skipped step returns a zero-gradient stand-in loss (``0 * sum(p.sum())`` over the
    trainable parameters) rather than None, which Lightning refuses under DDP: backward and DDP's gradient all-reduce
    run as usual on zeros, then ``drop_skipped_step`` sets every gradient to None, so the optimizer (AdamW, SGD, timm's)
    leaves weights, moments and weight decay alone; under fp16 the ``GradScaler`` has already recorded its (finite)
    check by then. Buffers are copied before the forward pass and restored after a bad one, so NaN
    activations never reach BatchNorm's running statistics. Under gradient accumulation a bad micro-batch drops the
    whole accumulated step.

    Args:
        max_nonfinite_steps: how many non-finite steps are skipped before the run stops (0: stop at the first).
    """

    def __init__(self, max_nonfinite_steps: int = 10) -> None:
        if max_nonfinite_steps < 0:
            raise UserError(f"model.max_nonfinite_steps {max_nonfinite_steps} must be >= 0 (0 stops at the first)")
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.count = 0
        self.skipping = False
        self._saved: list[Tensor] = []

    @staticmethod
    def _buffers(module: torch.nn.Module) -> list[Tensor]:
        return list(module.buffers())

    def before_forward(self, module: torch.nn.Module) -> None:
        """Remember the buffers the forward pass may update (BatchNorm statistics and batch counts)."""
        buffers = self._buffers(module)
        if len(self._saved) != len(buffers) or any(s.shape != b.shape for s, b in zip(self._saved, buffers)):
            self._saved = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._saved, [b.detach() for b in buffers])

    def __call__(self, module: L.LightningModule, loss: Tensor) -> Tensor:
        """``loss`` when it is finite on every process, else (counted) a zero-gradient stand-in and ``skipping``."""
        trainer = getattr(module, "_trainer", None)
        bad = float(not bool(torch.isfinite(loss.detach()).all()))
        if _sum_over_processes(trainer, [bad], loss.device)[0] == 0:
            return loss
        if self._saved:
            torch._foreach_copy_(self._buffers(module), self._saved)
        self.count += 1
        step = trainer.global_step if trainer is not None else -1
        logger.warning(f"non-finite loss ({loss.detach().float().item()}) at step {step}: step skipped ({self.count})")
        if trainer is not None:
            module.log("train/nonfinite_steps", float(self.count), on_step=True, on_epoch=False, batch_size=1)
        if self.count > self.max_nonfinite_steps:
            where = _last_checkpoint(trainer) if trainer is not None else "no trainer"
            raise TrainingHealthError(
                f"training stopped: the loss was not finite in {self.count} steps (the last at step {step}), more "
                f"than model.max_nonfinite_steps={self.max_nonfinite_steps}; {where}: lower the learning rate, "
                "clip gradients (trainer.gradient_clip_val), prefer bf16 to fp16, or check the data"
            )
        self.skipping = True
        params = [p for p in module.parameters() if p.requires_grad]
        return sum((p.sum() for p in params), loss.new_zeros(())) * 0.0

    def drop_skipped_step(self, module: torch.nn.Module) -> None:
        """In ``on_before_optimizer_step``: drop the gradients of a skipped step, so the optimizer leaves it alone."""
        if self.skipping:
            for p in module.parameters():
                p.grad = None
            self.skipping = False


class ExcludedImages(Metric):
    """Evaluation images left out of the metric because they do not decode, summed over processes.

    ``update(batch)`` counts the batch's ``ExcludedSamples`` (``datamodules/decode.py``; a batch without one excluded
    nothing); ``log_and_reset(module, stage)`` at the end of an evaluation epoch logs ``{stage}/excluded_images`` and
    keeps the figure as ``last`` for ``summary.json``. The state is a sum, so the count is exact under DDP, where the
    evaluation sampler gives every image to one process.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.last = 0

    def update(self, batch: Any) -> None:
        self.count += len(excluded_samples(batch))

    def compute(self) -> Tensor:
        return self.count

    def log_and_reset(self, module: L.LightningModule, stage: str) -> int:
        """Log the epoch's count (all processes must call it: it synchronises), reset, and return it."""
        self.last = int(self.compute())
        self.reset()
        module.log(f"{stage}/excluded_images", float(self.last), sync_dist=False)
        return self.last


def skip_counts(datamodule: Any) -> tuple[int, int, int]:
    """``(requested, skipped, dataset size)`` summed over the datamodule's datasets that carry a ``SkipCounter``:
    the training sets (evaluation sets never replace a sample, so they have none)."""
    requested = skipped = size = 0
    for dataset in list(vars(datamodule).values()) if datamodule is not None else []:
        counter = getattr(dataset, "skip_counter", None)
        if isinstance(counter, SkipCounter):
            requested += counter.requested
            skipped += counter.skipped
            size += len(dataset)
    return requested, skipped, size


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
        datamodule = trainer.datamodule
        requested, skipped, size = skip_counts(datamodule)
        requested, skipped = (int(v) for v in _sum_over_processes(trainer, [requested, skipped], pl_module.device))
        limit = getattr(datamodule, "max_skipped_fraction", None)
        if limit is not None and skipped > limit * max(requested, size):
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
                f"at step {trainer.global_step}; {_last_checkpoint(trainer)}: lower the learning rate or prefer bf16"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _, skipped = self._check_skipped(trainer, pl_module)
        guard = getattr(pl_module, "nonfinite_guard", None)
        self.summary = {
            "skipped_samples": skipped,
            "nonfinite_steps": guard.count if isinstance(guard, NonFiniteLossGuard) else 0,
            "overflow_steps": self.overflow_steps,
        }


def health_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
    """The ``summary.json`` fields: ``RunHealth``'s process-summed figures (else this process's own counts) and
    ``excluded_eval_images``, the images the last evaluation left out of its metric (summed over processes)."""
    excluded = next((m.last for m in pl_module.modules() if isinstance(m, ExcludedImages)), 0)
    for callback in trainer.callbacks:
        if isinstance(callback, RunHealth) and callback.summary:
            return {**callback.summary, "excluded_eval_images": excluded}
    guard = getattr(pl_module, "nonfinite_guard", None)
    return {
        "skipped_samples": skip_counts(trainer.datamodule)[1],
        "nonfinite_steps": guard.count if isinstance(guard, NonFiniteLossGuard) else 0,
        "overflow_steps": 0,
        "excluded_eval_images": excluded,
    }
