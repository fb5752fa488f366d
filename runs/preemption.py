"""Surviving preemption: a checkpoint on SIGTERM / SIGUSR1 (with SLURM requeue), then a clean exit, on every rank
at the same step.

Lightning turns SIGTERM into a stop at the next batch boundary, but its handler runs a ``broadcast`` from inside the
signal handler: a signal that reaches one rank only (``kill PID``, one node's slurmstepd) pairs that broadcast with
another rank's gradient all-reduce, and the job hangs until the collective timeout (reproduced: 2-rank gloo, SIGTERM
to either rank, no exit in 200 s). Its SLURM handler saves an ``hpc_ckpt`` mid-step into a file the run directory
contract does not know. ``Preemption`` replaces both. A stop signal only sets a flag; the ranks agree on the flags
at points every rank reaches in the same order — after each optimizer step (never between accumulated
micro-batches) and after each validation batch every rank has — with one ``all_reduce(MAX)`` of two integers, and
all stop there together: ``last.ckpt`` is saved, the SLURM job is requeued on the requeue signal, the exit code is 0.

Before the Trainer runs (the dataset scan, model building), nothing is there to save: ``stop_before_training``
handlers end the process at once with exit code 0 (and the requeue on the requeue signal) instead of the default
death by signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .process_rank import is_first_process
from .terminal import end_progress_bar_lines

__all__ = [
    "Preemption",
    "StoppedBeforeTraining",
    "report_stop_before_training",
    "requeue_slurm_job",
    "stop_before_training",
]

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1
_STOP, _REQUEUE = 0, 1


class StoppedBeforeTraining(SystemExit):
    """A stop signal arrived before training began: the process exits 0 with nothing to save."""

    def __init__(self, signum: int) -> None:
        super().__init__(0)
        self.signum = signum


def _stop_now(signum: int, frame: FrameType | None) -> None:
    raise StoppedBeforeTraining(signum)


def stop_before_training() -> dict[int, Any]:
    """Until ``Preemption`` takes over, SIGTERM and the requeue signal end the process with exit code 0 (the caller
    reports it, and requeues: ``StoppedBeforeTraining``), not with the default death by signal. Returns the handlers
    it replaced, for ``signal.signal`` to restore."""
    if os.name == "nt":
        return {}
    return {signum: signal.signal(signum, _stop_now) for signum in (signal.SIGTERM, REQUEUE_SIGNAL)}


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (an array task as ``JOB_TASK``); a failure is logged, not raised."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except FileNotFoundError:
        result = -1
    if result == 0:
        print(f"Requeued SLURM job {job}.", flush=True)
    else:
        log.warning("scontrol requeue %s failed (exit %s): resubmit the job to resume", job, result)


class Preemption(L.Callback):
    """On SIGTERM or the requeue signal to any rank: every rank finishes the same optimizer step, ``last.ckpt`` is
    saved, the SLURM job is requeued on the requeue signal, and every rank exits 0.

    SIGTERM is a stop (``scancel``, the time limit); the requeue signal (SIGUSR1, what ``#SBATCH
    --signal=SIGUSR1@90`` sends before the time limit) is a stop plus, on rank 0 under SLURM, ``scontrol requeue
    $SLURM_JOB_ID``. The requeued job reruns the same command; with the same run name (``SLURM_JOB_ID`` names the run
    by default and survives requeues) ``train.py`` resumes from ``last.ckpt``.

    A signal during validation stops at the next validation batch that every rank has (the evaluation sampler does
    not pad, so ranks may differ by one batch) or, at the latest, when validation ends; the checkpoint then holds the
    state before that validation, which the resumed run repeats. A signal between accumulated micro-batches waits for
    the optimizer step, so no accumulated gradient is dropped.

    Args:
        run_dir: The run directory; the checkpoint goes to ``run_dir/last.ckpt``.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.requeue_requested = False
        self._received = torch.zeros(2, dtype=torch.int64)
        self._previous_handlers: dict[int, Any] = {}
        self._val_batches_on_every_rank = 0
        self._stopping_in_validation = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received[_STOP] = 1
        if signum == REQUEUE_SIGNAL:
            self._received[_REQUEUE] = 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or os.name == "nt":
            return
        for signum in (signal.SIGTERM, REQUEUE_SIGNAL):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        # NOTE: Lightning composes its SIGTERM notifier (a collective inside the handler) with the handler it finds;
        # the notifier is replaced by the flag, and a requeue handler already in place keeps it off SIGUSR1.
        trainer._signal_connector._sigterm_notifier_fn = self._on_signal

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a stop signal (a collective: call only where every rank calls it)."""
        received = self._received.clone()
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            received = received.to(trainer.strategy.root_device)
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
            received = received.cpu()
        if not received[_STOP]:
            return False
        self.requeue_requested = bool(received[_REQUEUE])
        trainer._signal_connector.received_sigterm = True  # NOTE: Lightning's loops stop here, on every rank at once
        return True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self._agreed(trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches = torch.tensor([sum(int(n) for n in trainer.num_val_batches)], dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            batches = batches.to(trainer.strategy.root_device)
            dist.all_reduce(batches, op=dist.ReduceOp.MIN)
        self._val_batches_on_every_rank = int(batches.item())

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        # NOTE: never at a rank's last batch, where Lightning's evaluation loop does not stop on received_sigterm
        if not trainer.sanity_checking and batch_idx < self._val_batches_on_every_rank - 1:
            self._agreed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._agreed(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.run_dir / "last.ckpt"
        self._stopping_in_validation = trainer.validating
        trainer.save_checkpoint(path, weights_only=False)  # NOTE: the full state, to resume from
        self._stopping_in_validation = False
        if trainer.is_global_zero:
            end_progress_bar_lines()
            step = trainer.global_step
            print(f"Preempted at step {step}: saved {path}; rerun the same command to resume.", flush=True)
        if self.requeue_requested and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._stopping_in_validation:
            _mark_validation_unfinished(checkpoint)


def _mark_validation_unfinished(checkpoint: dict[str, Any]) -> None:
    """Make the fit resumed from ``checkpoint``, saved by a stop during a validation, run that validation again.

    Lightning repeats a validation only when its checkpoint was written inside a validation batch (one batch
    started, not processed); stopped after one, it would resume past the rest of the validation, and the epoch's
    metrics and best checkpoint would be lost (reproduced: no epoch-0 row in metrics.csv after the resume). The
    validation's progress is marked so, and its per-run counts zeroed, so the resumed run validates again, every
    batch from the first (metric states are not saved).
    """
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    total = progress["total"]
    total["started"] = total["ready"] = (
        total["started"] + 1 if total["started"] == total["processed"] else total["started"]
    )
    total["processed"] = total["completed"] = total["started"] - 1
    progress["current"] = dict.fromkeys(progress["current"], 0)


def report_stop_before_training(stop: StoppedBeforeTraining) -> None:
    """Say that a stop signal ended the run outside training (nothing to save); requeue on the requeue signal."""
    name = signal.Signals(stop.signum).name
    if is_first_process():
        print(f"Stopped by {name} while no training step was running: nothing to save.", flush=True)
        if stop.signum == REQUEUE_SIGNAL and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job()
