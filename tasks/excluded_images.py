"""The count of evaluation images left out of the metric because they do not decode, summed over processes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.decode import excluded_samples

__all__ = ["ExcludedImages"]


class ExcludedImages(Metric):
    """Evaluation images left out of the metric because they do not decode, summed over processes.

    ``update(batch)`` counts the batch's ``ExcludedSamples`` (``datamodules/decode.py``; a batch without one excluded
    nothing); ``log_and_reset(module, stage)`` at the end of an evaluation epoch logs ``{stage}/excluded_images`` and
    keeps the figure as ``last`` for ``summary.json``. The state is a sum, so the count is exact under DDP, where the
    evaluation sampler gives every image to one process.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.last = 0

    def update(self, batch: Any) -> None:
        self.count += len(excluded_samples(batch))

    def compute(self) -> Tensor:
        return self.count

    def log_and_reset(self, module: L.LightningModule, stage: str) -> int:
        """Log the epoch's count (all processes must call it: it synchronises), reset, and return it."""
        self.last = int(self.compute())
        self.reset()
        module.log(f"{stage}/excluded_images", float(self.last), sync_dist=False)
        return self.last
