"""Random streams that resume: every rank's ``random`` / ``numpy`` / ``torch`` state travels in the checkpoints.

``RandomStateCheckpoint`` seeds every rank's streams differently (DeiT's ``seed + rank``), stores each rank's
``random`` / ``numpy`` / ``torch`` (CPU and CUDA) streams in checkpoints, as plain tensors and ints so that they load
with ``weights_only=True``, and puts them back on resume.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch

from datamodules.loaders import distributed_world

__all__ = ["RandomStateCheckpoint"]

log = logging.getLogger(__name__)


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
