"""Semantic segmentation metrics as the ADE20K benchmark (and mmsegmentation's ``IoUMetric``) computes them.

Written here rather than taken from torchmetrics because the benchmark's averaging differs: intersections and unions
are summed per class over the whole evaluation set, and the class mean skips classes that never occur in either the
labels or the predictions (NaN-mean), whereas ``MulticlassJaccardIndex`` scores such classes as ``zero_division``.
The state is one confusion matrix, summed across processes, so the result is exact under DDP. An image excluded from
evaluation because it does not decode (``data.eval_undecodable: exclude``) never reaches ``update``: the matrix, and
every figure computed from it, is the one of the dataset without that image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(Metric):
    """Confusion-matrix mIoU, mAcc and aAcc over a dataset (Everingham et al., PASCAL VOC; Zhou et al., ADE20K).

    With ``C[i, j]`` the number of pixels of true class ``i`` predicted as ``j`` (ignored pixels excluded)::

        IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k]),   mIoU = nanmean_k IoU_k
        Acc_k = C[k, k] / sum_j C[k, j],                                mAcc = nanmean_k Acc_k
        aAcc  = trace(C) / sum(C)

    ``update(preds, target)`` takes class indices of equal shape; ``compute()`` returns ``{"mIoU", "mAcc", "aAcc",
    "IoU_per_class"}``.

    Args:
        num_classes: number of classes.
        ignore_index: label value excluded from every count.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
        keep = target != self.ignore_index
        t, p = target[keep].long(), preds[keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target holds labels outside [0, {self.num_classes}) other than {self.ignore_index}")
        index = t * self.num_classes + p.clamp(0, self.num_classes - 1)
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        c = self.confusion.double()
        tp = c.diag()
        gt, pred = c.sum(1), c.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = c.sum()
        return {
            "mIoU": iou.nanmean().float(),
            "mAcc": acc.nanmean().float(),
            "aAcc": (tp.sum() / total).float() if total > 0 else torch.tensor(float("nan")),
            "IoU_per_class": iou.float(),
        }
