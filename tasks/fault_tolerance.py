"""Surviving preemption: a checkpoint on SIGTERM / SIGUSR1 (with SLURM requeue) and random streams that resume.

Lightning turns SIGTERM into a clean stop at the next batch boundary (all DDP ranks agree through a broadcast from
rank 0) but saves nothing; its SLURM handler saves an ``hpc_ckpt`` from inside the signal handler, mid-step, into a
file the run directory contract does not know. ``Preemption`` replaces both: it saves ``last.ckpt`` at the batch
boundary, requeues the SLURM job on the requeue signal, and the process exits with code 0. ``RandomStateCheckpoint``
seeds every rank's streams differently (DeiT's ``seed + rank``), stores each rank's ``random`` / ``numpy`` / ``torch``
(CPU and CUDA) streams in checkpoints, as plain tensors and ints so that they load with ``weights_only=True``, and puts
them back on resume.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from datamodules.loaders import distributed_world

__all__ = ["Preemption", "RandomStateCheckpoint"]

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
        trainer.save_checkpoint(path)
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


def _process_state() -> dict[str, Any]:
    """This process's ``random`` / ``numpy`` / ``torch`` (CPU and CUDA) streams as tensors, ints and lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_process_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStateCheckpoint(L.Callback):
    """Per-rank random streams: seeded ``seed + rank`` at the start of ``fit``, saved with every checkpoint, restored.

    Every rank shares the data order (the loader seed is rank 0's, ``datamodules/loaders.py``), but what the ranks
    draw from their own streams must differ: mixup/cutmix lambdas and boxes, drop-path and dropout masks. DeiT seeds
    each process with ``seed + rank`` (BiFormer ``main.py``); so does this callback when ``fit`` starts, from
    Lightning's ``seed_everything`` seed (``PL_GLOBAL_SEED``), so rank 0 keeps exactly the single-process stream.
    Checkpoints hold every rank's streams (gathered, as plain tensors and ints so that they load with
    ``weights_only=True``), and each rank restores its own on resume; a resume on another world size gives rank ``r``
    the saved stream ``r % saved``, reseeded with ``r`` added when it is not its own. Without them a resumed run draws
    different masks from the step it resumes at.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if stage == "fit" and seed is not None and trainer.global_rank > 0:
            L.seed_everything(int(seed) + trainer.global_rank, workers=True, verbose=False)
            os.environ["PL_GLOBAL_SEED"] = seed  # NOTE: the run's seed stays the one the config names

    def state_dict(self) -> dict[str, Any]:
        world, _ = distributed_world()
        states = [_process_state()]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, _process_state())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        states = state_dict.get("ranks", [state_dict])  # NOTE: checkpoints before per-rank streams held one
        _, rank = distributed_world()
        _restore_process_state(states[rank % len(states)])
        if rank >= len(states):
            log.warning(
                "resumed on %s+ ranks from a checkpoint of %s: rank %s reseeds its stream", rank, len(states), rank
            )
            L.seed_everything(int(torch.randint(2**31, ()).item()) + rank, workers=True, verbose=False)
