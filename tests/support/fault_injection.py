"""Callbacks that inject faults into a real training run, for the resume tests.

Used from the command line as ``--trainer.callbacks+=tests.support.fault_injection.KillAtStep``; the run is in a
subprocess, so the kill is a real ``SIGKILL`` (no cleanup, no atomic-write courtesy) or ``SIGTERM``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as L
import torch


class KillAtStep(L.Callback):
    """Sends ``signal_name`` to this process once ``trainer.global_step`` reaches ``step`` (after that step's hooks)."""

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class KillDuringSave(L.Callback):
    """At ``step``, the next checkpoint write dies half-way: ``torch.save`` writes, truncates to half, then SIGKILL."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        real_save = torch.save

        def dying_save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
            real_save(obj, f, *a, **kw)
            f.truncate(f.tell() // 2) if hasattr(f, "truncate") else None
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save  # type: ignore[assignment]
