"""Non-finite losses skip their step on every process; after ``max_nonfinite_steps`` of them the run stops.

Research-side training health, used in every task's ``training_step`` (through ``tasks/base.py``); the run-side part
(undecodable samples, fp16 overflow, non-finite weights before a save) is ``runs/health.py``.
"""

from __future__ import annotations

import logging

import lightning.pytorch as L
import torch
from torch import Tensor

from core.errors import ConfigError, TrainingHealthError

__all__ = ["NonFiniteLossGuard", "last_checkpoint", "sum_over_processes"]

logger = logging.getLogger(__name__)


def sum_over_processes(trainer: L.Trainer | None, values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the trainer's processes (itself without one or without DDP)."""
    tensor = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    if trainer is not None and trainer.world_size > 1:
        tensor = trainer.strategy.reduce(tensor, reduce_op="sum")
    return tensor.tolist()


def last_checkpoint(trainer: L.Trainer) -> str:
    """Where the last good checkpoint is, for the messages that stop a run."""
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
            raise ConfigError(f"model.max_nonfinite_steps {max_nonfinite_steps} must be >= 0 (0 stops at the first)")
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
        if sum_over_processes(trainer, [bad], loss.device)[0] == 0:
            return loss
        if self._saved:
            torch._foreach_copy_(self._buffers(module), self._saved)
        self.count += 1
        step = trainer.global_step if trainer is not None else -1
        logger.warning(f"non-finite loss ({loss.detach().float().item()}) at step {step}: step skipped ({self.count})")
        if trainer is not None:
            module.log("train/nonfinite_steps", float(self.count), on_step=True, on_epoch=False, batch_size=1)
        if self.count > self.max_nonfinite_steps:
            where = last_checkpoint(trainer) if trainer is not None else "no trainer"
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
