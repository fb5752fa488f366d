"""A process of a two-rank gloo group that records its random streams, for tests/tasks/test_recipes_imagenet.py.

Kept apart from the test module so that spawned processes import only what they need.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from runs.random_streams import RandomStateCheckpoint


def _draws() -> dict[str, list[float]]:
    return {"torch": torch.rand(3).tolist(), "numpy": np.random.beta(0.8, 0.8, 3).tolist()}


def record_rank_streams(rank: int, world: int, port: int, out: str) -> None:
    """Seed as a run does, checkpoint the streams, draw; scramble, restore from the saved file, draw again."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PL_GLOBAL_SEED="7")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(7), np.random.seed(7)
    callback = RandomStateCheckpoint()
    callback.setup(SimpleNamespace(global_rank=rank), None, "fit")
    state_file = f"{out}/streams.pt"
    state = callback.state_dict()
    if rank == 0:
        torch.save(state, state_file)  # NOTE: only rank 0 writes checkpoints
    first = _draws()
    dist.barrier()
    torch.manual_seed(1234), np.random.seed(1234)
    callback.load_state_dict(torch.load(state_file, weights_only=True))
    torch.save({"first": first, "resumed": _draws(), "ranks_saved": len(state["ranks"])}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
