"""The learning-rate schedules of the papers' detection and segmentation recipes, as mmcv's ``LrUpdaterHook`` runs them.

The BiFormer / DaViT COCO and ADE20K numbers were trained with mmdetection 2.x / mmsegmentation 0.x, whose schedules
are mmcv 1.x hooks (``StepLrUpdaterHook``, ``PolyLrUpdaterHook``, ``CosineAnnealingLrUpdaterHook``). timm's schedulers
are close but not equal: their linear warmup climbs to the base rate rather than scaling the already decayed rate,
and ``MultiStepLRScheduler`` decays one iteration early (``bisect_right(milestones, t + 1)``). Written here because
mmcv is not a dependency; built on timm's ``Scheduler`` so that ``step_update``, ``lr_scale`` param groups and
checkpointing behave as they do for the classification task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.scheduler.scheduler import Scheduler

from core.errors import ConfigError

__all__ = ["MMCV_POLICIES", "MMCVLrSchedule", "optimizer_steps_per_epoch"]

MMCV_POLICIES = ("step", "poly", "cosine")


class MMCVLrSchedule(Scheduler):
    """mmcv's iteration-stepped LR schedule with linear warmup, for every param group's base rate ``b``.

    At optimizer update ``t`` (0-based) the regular rate is::

        step:    b * gamma ** #{m in milestones : t // steps_per_epoch >= m}     (mmdet ``policy='step'``, by epoch)
        poly:    (b - min_lr) * (1 - t / T) ** power + min_lr                      (mmseg ``policy='poly'``)
        cosine:  m + (b - m) * (1 + cos(pi * t / T)) / 2,  m = min_lr or b * min_lr_ratio (``CosineAnnealing``)

    and during warmup (``t < warmup_iters``, mmcv ``warmup='linear'``) it is scaled by
    ``1 - (1 - t / warmup_iters) * (1 - warmup_ratio)``, so update 0 runs at ``warmup_ratio * regular(0)``.

    Args:
        optimizer: the optimizer whose groups are scheduled (``lr_scale`` in a group multiplies its rate).
        policy: ``"step"``, ``"poly"`` or ``"cosine"``.
        total_iters: ``T``, the number of optimizer updates of the run (poly and cosine).
        warmup_iters: linear warmup length in updates (0: none).
        warmup_ratio: the warmup's starting fraction.
        milestones: epochs counted from the start of training after which the rate is multiplied by ``gamma``
            (step policy).
        gamma: step decay factor.
        steps_per_epoch: optimizer updates per epoch (step policy).
        power: poly exponent.
        min_lr: floor of poly and cosine (absolute).
        min_lr_ratio: floor of cosine as a fraction of the base rate; overrides ``min_lr``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        policy: str,
        total_iters: int,
        *,
        warmup_iters: int = 0,
        warmup_ratio: float = 0.1,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        steps_per_epoch: int = 1,
        power: float = 1.0,
        min_lr: float = 0.0,
        min_lr_ratio: float | None = None,
    ) -> None:
        if policy not in MMCV_POLICIES:
            raise ConfigError(f"LR policy {policy!r} is not supported: use one of {', '.join(MMCV_POLICIES)}")
        if warmup_iters < 0 or not 0.0 < warmup_ratio <= 1.0:
            raise ConfigError(
                f"warmup_iters {warmup_iters} must be >= 0 and warmup_ratio {warmup_ratio} in (0, 1] (e.g. 500, 0.001)"
            )
        if total_iters < 1 or steps_per_epoch < 1:
            raise ConfigError(f"the schedule needs total_iters >= 1 and steps_per_epoch >= 1 ({total_iters=})")
        self.policy = policy
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.steps_per_epoch = int(steps_per_epoch)
        self.power = float(power)
        self.min_lr = float(min_lr)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.update_groups(self._get_lr(0))  # NOTE: update 0 already runs at the warmup rate, as mmcv's first iter

    def regular_lr(self, base: float, t: int) -> float:
        """The schedule without warmup at update ``t`` for base rate ``base``."""
        if self.policy == "step":
            epoch = t // self.steps_per_epoch
            return base * self.gamma ** sum(epoch >= m for m in self.milestones)
        progress = min(t, self.total_iters) / self.total_iters
        if self.policy == "poly":
            return (base - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr
        floor = base * self.min_lr_ratio if self.min_lr_ratio is not None else self.min_lr
        return floor + 0.5 * (base - floor) * (math.cos(math.pi * progress) + 1.0)

    def warmup_factor(self, t: int) -> float:
        """mmcv's linear warmup multiplier at update ``t`` (1 after warmup)."""
        if t >= self.warmup_iters:
            return 1.0
        return 1.0 - (1.0 - t / self.warmup_iters) * (1.0 - self.warmup_ratio)

    def _get_lr(self, t: int) -> list[float]:
        factor = self.warmup_factor(t)
        return [self.regular_lr(base, t) * factor for base in self.base_values]


def optimizer_steps_per_epoch(trainer: Any) -> int:
    """Optimizer updates per training epoch: ``ceil(batches / accumulate_grad_batches)`` (Lightning also steps the last,
    partial accumulation of an epoch). Call in ``configure_optimizers`` after ``trainer.estimated_stepping_batches``."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return max(1, int(trainer.estimated_stepping_batches) // max(1, trainer.max_epochs or 1))
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))
