"""Lightning's checkpoint I/O for the run layer: saves that are atomic, loads that fail in one line naming the file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from core.checkpoint_files import check_state_dict, load_checkpoint_file
from core.errors import CheckpointError
from core.files import write_atomically

__all__ = ["AtomicCheckpointIO", "CheckedCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``core.files.write_atomically``: ``path`` always holds either the previous complete
    checkpoint or the new complete one (Lightning's own writer streams straight into the final file).

    A save the filesystem refuses for space (``ENOSPC``, ``EDQUOT``, ``EFBIG``; ``torch.save`` reports it as a
    ``RuntimeError`` "unexpected pos") is a one-line ``DiskFullError`` naming ``path``, the space left and the fix;
    the temporary ``.<name>.tmp`` is removed and ``path`` keeps the previous checkpoint, which a rerun resumes from.
    Lightning saves on rank 0 only; under DDP the other ranks wait at ``Trainer.save_checkpoint``'s barrier until
    rank 0's exit breaks it: with gloo at once, each with a "Connection closed by peer" traceback of its own.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (``storage_options`` is not used)."""
        write_atomically(path, lambda f: torch.save(checkpoint, f))


class CheckedCheckpointIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` whose loads fail with ``CheckpointError``: file named, keys listed (``--ckpt_path``).

    Args:
        model: the LightningModule the checkpoint will be loaded into; its ``state_dict`` keys and shapes are checked
            before Lightning loads the checkpoint (None, or a module with ``strict_loading = False``: no key check).
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        checkpoint = load_checkpoint_file(
            path,
            map_location=map_location if map_location is not None else "cpu",
            weights_only=True if weights_only is None else weights_only,
        )
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"checkpoint {path} has no 'state_dict': it is not a Lightning checkpoint (a weights file goes to "
                "model.pretrained_file instead)"
            )
        if self.model is not None and getattr(self.model, "strict_loading", True):
            check_state_dict(self.model, state, path)
        return checkpoint
