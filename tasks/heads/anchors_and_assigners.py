"""mmdetection 2.x's anchors and ``MaxIoUAssigner`` as torchvision objects, for the detectors of ``configs/coco``.

torchvision's ``AnchorGenerator`` rounds every base anchor's corners to whole pixels, and its ``Matcher`` gives a
low-quality match to the ground truth the prediction overlaps most, with no IoU floor; mmdetection keeps anchors
exact and assigns each ground truth's best predictions to that ground truth when the overlap reaches
``min_pos_iou`` (``mmdet/core/bbox/assigners/max_iou_assigner.py``). Written here because torchvision exposes neither
as an option and mmdetection is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator

__all__ = ["ExactAnchorGenerator", "MaxIoUAssigner", "octave_anchor_generator"]


class ExactAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` without the rounding: mmdet's ``AnchorGenerator`` (``center_offset=0``).

    Base anchors of size ``s`` and aspect ratio ``r`` at a location: ``(-w/2, -h/2, w/2, h/2)`` with
    ``h = s * sqrt(r)``, ``w = s / sqrt(r)``, ratio-major then scale, shifted by ``stride * (i, j)``.
    """

    def generate_anchors(
        self,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),  # noqa: B008  (torchvision's signature)
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales_t[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales_t[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def octave_anchor_generator(
    strides: Sequence[int] = (8, 16, 32, 64, 128),
    octave_base_scale: float = 4.0,
    scales_per_octave: int = 3,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> ExactAnchorGenerator:
    """mmdet's RetinaNet anchors: sizes ``octave_base_scale * stride * 2 ** (k / scales_per_octave)`` per level."""
    sizes = tuple(
        tuple(octave_base_scale * stride * 2 ** (k / scales_per_octave) for k in range(scales_per_octave))
        for stride in strides
    )
    return ExactAnchorGenerator(sizes, (tuple(ratios),) * len(strides))


class MaxIoUAssigner(Matcher):
    """mmdetection's ``MaxIoUAssigner`` in torchvision's ``Matcher`` interface (``(G, N)`` IoU -> ``(N,)`` matches).

    A prediction whose best IoU is below ``neg_iou_thr`` is background (``BELOW_LOW_THRESHOLD``), at or above
    ``pos_iou_thr`` it matches its best ground truth, in between it is ignored (``BETWEEN_THRESHOLDS``). Then, with
    ``match_low_quality``, for each ground truth ``i`` in order whose best IoU ``m_i`` is at least ``min_pos_iou``,
    every prediction with IoU ``== m_i`` is matched to ``i`` (a later ground truth overwrites an earlier one).

    Args:
        pos_iou_thr: IoU for a positive match.
        neg_iou_thr: IoU below which a prediction is background.
        min_pos_iou: the floor of a low-quality match.
        match_low_quality: give every ground truth its best predictions.
    """

    def __init__(
        self, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float, match_low_quality: bool = True
    ) -> None:
        super().__init__(pos_iou_thr, neg_iou_thr, allow_low_quality_matches=match_low_quality)
        self.min_pos_iou = float(min_pos_iou)

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        if match_quality_matrix.numel() == 0:
            return super().__call__(match_quality_matrix)  # NOTE: torchvision's errors for empty inputs
        best, best_gt = match_quality_matrix.max(dim=0)
        matches = torch.full_like(best_gt, self.BETWEEN_THRESHOLDS)
        matches[best < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        positive = best >= self.high_threshold
        matches[positive] = best_gt[positive]
        if self.allow_low_quality_matches:
            gt_best = match_quality_matrix.max(dim=1).values
            hits = (match_quality_matrix == gt_best[:, None]) & (gt_best[:, None] >= self.min_pos_iou)
            hit = hits.any(dim=0)
            last_gt = hits.shape[0] - 1 - hits.flip(0).to(torch.uint8).argmax(dim=0)  # NOTE: the last gt wins
            matches[hit] = last_gt[hit]
        return matches
