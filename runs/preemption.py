"""Surviving preemption: a checkpoint on SIGTERM / SIGUSR1 (with SLURM requeue), then a clean exit.

Lightning turns SIGTERM into a clean stop at the next batch boundary (all DDP ranks agree through a broadcast from
rank 0) but saves nothing; its SLURM handler saves an ``hpc_ckpt`` from inside the signal handler, mid-step, into a
file the run directory contract does not know. ``Preemption`` replaces both: it saves ``last.ckpt`` at the batch
boundary, requeues the SLURM job on the requeue signal, and the process exits with code 0.
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
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["Preemption"]

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    """On SIGTERM or the requeue signal: finish the current step, save ``last.ckpt``, requeue on SLURM, exit 0.

    SIGTERM is Lightning's own clean stop (``trainer.received_sigterm``); the requeue signal (SIGUSR1, what
    ``#SBATCH --signal=SIGUSR1@90`` sends before the time limit) is turned into the same stop plus, on rank 0 under
    SLURM, ``scontrol requeue $SLURM_JOB_ID``. The requeued job reruns the same command; with the same run name
    (``SLURM_JOB_ID`` names the run by default and survives requeues) ``train.py`` resumes from ``last.ckpt``.

    Args:
        run_dir: The run directory; the checkpoint goes to ``run_dir/last.ckpt``.
        requeue_signal: The signal that asks for a checkpoint and a requeue.
    """

    def __init__(self, run_dir: str | Path, requeue_signal: int = signal.SIGUSR1) -> None:
        self.run_dir = Path(run_dir)
        self.requeue_signal = requeue_signal
        self.requeue_requested = False
        self._previous_handler: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or os.name == "nt":
            return
        # NOTE: registered before the Trainer's own handlers, so Lightning skips its mid-step SLURM save
        self._previous_handler = signal.signal(self.requeue_signal, self._on_requeue_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(self.requeue_signal, self._previous_handler)
            self._previous_handler = None

    def _on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requeue_requested = True
        os.kill(os.getpid(), signal.SIGTERM)  # NOTE: Lightning's SIGTERM path stops every rank at the same step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self.run_dir / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # NOTE: the full state, to resume from
        if trainer.is_global_zero:
            step = trainer.global_step
            print(f"Preempted at step {step}: saved {path}; rerun the same command to resume.", flush=True)
        if self.requeue_requested and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            self._requeue()

    @staticmethod
    def _requeue() -> None:
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
