"""Callbacks that inject faults into a real training run, for the resume tests.

Used from the command line as ``--trainer.callbacks+=tests.support.fault_injection.KillAtStep``; the run is in a
subprocess, so the kill is a real ``SIGKILL`` (no cleanup, no atomic-write courtesy) or ``SIGTERM``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


class SignalGroupAtStep(L.Callback):
    """Sends ``signal_name`` to this process's whole group at ``step``, as slurmstepd signals every process of a job
    step (``kill -USR1 -PGID``): DataLoader workers get it too. The run must lead its own group (``setsid``).

    The signal is sent by a separate process, as slurmstepd is one: a signal the run's main process sent
    itself would reach its workers as one from their parent, which torch's (and Strata's) workers obey by exiting."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            if os.getpgrp() != os.getpid():
                raise RuntimeError("SignalGroupAtStep needs a run that leads its process group (start_new_session)")
            killer = "import os, sys; os.killpg(int(sys.argv[1]), int(sys.argv[2]))"
            subprocess.run([sys.executable, "-c", killer, str(os.getpgrp()), str(int(self.signum))], check=False)


class WaitForFileAtStep(L.Callback):
    """Holds the run at ``step`` until ``path`` exists (at most ``timeout`` seconds): a run that is surely running."""

    def __init__(self, step: int, path: str, timeout: float = 120.0) -> None:
        self.step, self.path, self.timeout = step, path, timeout

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.1)


class SignalRankAtStep(L.Callback):
    """Sends ``signal_name`` to one DDP rank's process only, at ``step``, from a separate process (``kill -TERM PID``
    on one node, a node's slurmstepd, or the OOM killer's SIGKILL)."""

    def __init__(self, step: int, rank: int, signal_name: str = "SIGTERM", stamp: str | None = None) -> None:
        self.step, self.rank, self.stamp = step, rank, stamp
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.stamp:
                with open(self.stamp, "w") as f:
                    f.write(str(time.time()))
            killer = "import os, sys; os.kill(int(sys.argv[1]), int(sys.argv[2]))"
            subprocess.run([sys.executable, "-c", killer, str(os.getpid()), str(int(self.signum))], check=False)


class SignalAtBatch(L.Callback):
    """Sends ``signal_name`` to this process after training batch number ``batch`` (counted from 0 over the whole
    run, micro-batches included): with gradient accumulation, a signal between the micro-batches of one step."""

    def __init__(self, batch: int, signal_name: str = "SIGTERM") -> None:
        self.batch = batch
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch * trainer.num_training_batches + batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class SignalAtValidationBatch(L.Callback):
    """Sends ``signal_name`` to this process after validation batch ``batch`` of the first validation of fit (not
    the sanity check): a signal during a long validation."""

    def __init__(self, batch: int, signal_name: str = "SIGTERM") -> None:
        self.batch, self.sent = batch, False
        self.signum = getattr(signal, signal_name)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if not trainer.sanity_checking and not self.sent and batch_idx == self.batch:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalInSetup(L.Callback):
    """Sends ``signal_name`` to this process while the Trainer sets up (after the data is scanned, before any step)."""

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signum = getattr(signal, signal_name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        os.kill(os.getpid(), self.signum)


class KillAfterWriting(L.Callback):
    """SIGKILL right after the checkpoint file ``file_name`` is written in epoch ``epoch``: between ``best.ckpt`` and
    ``last.ckpt``, which Lightning writes one after the other at the end of a validation."""

    def __init__(self, file_name: str = "best.ckpt", epoch: int = 0) -> None:
        self.file_name, self.epoch = file_name, epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        real_save = checkpoint_io.save_checkpoint

        def save_then_die(checkpoint: dict[str, Any], path: Any, *args: Any, **kwargs: Any) -> None:
            real_save(checkpoint, path, *args, **kwargs)
            if os.path.basename(str(path)) == self.file_name and trainer.current_epoch == self.epoch:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint_io.save_checkpoint = save_then_die  # type: ignore[method-assign]


class StallRankAtStep(L.Callback):
    """One DDP rank stops responding at ``step`` for ``seconds`` (a hung filesystem, a wedged device), writing the
    time it stalled to ``stamp``."""

    def __init__(self, step: int, rank: int, seconds: float, stamp: str) -> None:
        self.step, self.rank, self.seconds, self.stamp = step, rank, seconds, stamp

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            with open(self.stamp, "w") as f:
                f.write(str(time.time()))
            time.sleep(self.seconds)
