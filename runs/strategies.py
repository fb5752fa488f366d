"""DDP with a bounded collective timeout.

A rank that dies or stalls leaves the others waiting inside a collective. torchrun and ``srun --kill-on-bad-exit``
end the job when a rank exits with an error, and Lightning's launcher kills its child ranks when one fails; but a
rank that stalls (a hung filesystem, a wedged GPU) or a launcher that does not tear down (Lightning's, when rank 0
itself dies: its watcher thread dies with it) leaves the rest in the collective for torch's default 30 minutes,
with NCCL holding the GPUs. ``--collective_timeout`` (minutes, default 10) bounds that wait: longer than rank 0's
longest lone work between collectives (a checkpoint save, the COCO evaluation), much shorter than a wasted half hour.
"""

from __future__ import annotations

import signal
from datetime import timedelta
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from core.errors import ConfigError

__all__ = ["DDP_NAMES", "EndChildRanksOnFailure", "ddp_with_timeout"]

DDP_NAMES = {"ddp": None, "ddp_find_unused_parameters_true": True, "ddp_find_unused_parameters_false": False}


def ddp_with_timeout(strategy: Any, minutes: float) -> Any:
    """``strategy`` as given, except a DDP strategy named by string (``--trainer.strategy ddp``), which becomes a
    ``DDPStrategy`` whose collectives time out after ``minutes``; a configured ``DDPStrategy`` keeps its own."""
    if minutes <= 0:
        raise ConfigError(f"collective_timeout {minutes} is in minutes: use a positive value (e.g. 10)")
    if not isinstance(strategy, str) or strategy not in DDP_NAMES:
        return strategy
    unused = DDP_NAMES[strategy]
    options: dict[str, Any] = {} if unused is None else {"find_unused_parameters": unused}
    return DDPStrategy(timeout=timedelta(minutes=minutes), **options)


class EndChildRanksOnFailure(L.Callback):
    """Under Lightning's launcher, rank 0 ends the ranks it started when it fails.

    Lightning's launcher watches its child ranks from a thread in rank 0 and ends them all when one fails; when rank
    0 itself fails (a collective timed out on a stalled rank, a full disk), that thread dies with it and the children
    are left running, a stalled one forever. torchrun and srun end the other ranks themselves.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            return  # NOTE: a preemption stop: every rank saves and exits by itself
        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(signal.SIGKILL)
