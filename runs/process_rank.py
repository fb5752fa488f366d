"""Which process of a distributed job this is, read from the launcher's environment before torch.distributed starts.

The run layer decides some things before the Trainer exists (who takes the run-directory lock, who writes the wandb
run id), so it cannot ask ``trainer.global_rank``. Each launcher names the process its own way:

| launcher | variables of a process that is not the job's first |
|---|---|
| torchrun / torchelastic | ``RANK`` (global), ``GROUP_RANK`` (node) |
| srun | ``SLURM_PROCID`` (the task) |
| Lightning's own launcher | ``LOCAL_RANK`` (the processes it starts), ``NODE_RANK`` (multi-node) |

The job's first process is the one where every variable that is set says 0: under torchrun inside srun (one task
per node) the first node's first worker has ``RANK=0`` and ``SLURM_PROCID=0``, every other worker a non-zero one.
"""

from __future__ import annotations

import os

__all__ = ["RANK_VARIABLES", "is_first_process"]

RANK_VARIABLES = ("RANK", "GROUP_RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_first_process() -> bool:
    """True in the job's first process (global rank 0), from the launcher variables of the module docstring."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)
