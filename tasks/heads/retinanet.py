"""RetinaNet as mmdetection 2.x's ``RetinaHead`` trains it, on torchvision's ``RetinaNet``.

Lin et al., "Focal Loss for Dense Object Detection" (arXiv 1708.02002). torchvision's model differs from mmdetection's
``retinanet_r50_fpn.py`` (the base of BiFormer's RetinaNet config) in three places, fixed here:

- classes: mmdet has one sigmoid output per foreground class; torchvision indexes its outputs by label, so the
  project's labels ``1..K`` would need a dead background column (which can then be predicted as label 0);
- loss normalisation: mmdet divides the summed focal and L1 losses of the whole batch by the batch's positives
  (``num_total_pos = sum_i max(pos_i, 1)``, ``anchor_head.py``); torchvision divides per image and then averages over
  images, which weights images with few objects more;
- anchor sizes: mmdet's octave scales ``4 * stride * 2 ** (k / 3)``; torchvision truncates them to integers
  (40 and 50 instead of 40.3 and 50.8 at stride 8).

Left as torchvision has it (listed in ``configs/coco/retinanet_biformer_small_1x.yaml``): the test-time candidate
selection (top 1000 (anchor, class) pairs per level where mmdet takes the top 1000 anchors by their best class).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import sigmoid_focal_loss

__all__ = ["ForegroundRetinaNet", "PooledLossRetinaNetHead", "octave_anchor_generator"]


def octave_anchor_generator(
    strides: tuple[int, ...] = (8, 16, 32, 64, 128),
    octave_base_scale: float = 4.0,
    scales_per_octave: int = 3,
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
) -> AnchorGenerator:
    """mmdet's RetinaNet ``AnchorGenerator``: sizes ``octave_base_scale * stride * 2 ** (k / scales_per_octave)``.

    torchvision still rounds each base anchor's corners to whole pixels (at most 0.5 px from mmdet's).
    """
    sizes = tuple(
        tuple(octave_base_scale * stride * 2 ** (k / scales_per_octave) for k in range(scales_per_octave))
        for stride in strides
    )
    return AnchorGenerator(sizes, (tuple(ratios),) * len(strides))


class PooledLossRetinaNetHead(RetinaNetHead):
    """torchvision's ``RetinaNetHead`` with mmdet's loss normalisation: losses summed over the batch, divided once.

    With ``P = sum_i max(1, |pos_i|)`` over the images ``i`` of the batch::

        classification = sum_i sum_{a not ignored} focal(logit_ia, onehot_ia) / P          (gamma 2, alpha 0.25)
        bbox_regression = sum_i sum_{a in pos_i} |delta_ia - encode(gt_ia, anchor_a)|_1 / P
    """

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        box_coder = self.regression_head.box_coder
        classification, regression, positives = [], [], 0
        for target, logits, deltas, anchor, matched in zip(
            targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs
        ):
            foreground = matched >= 0
            positives += max(1, int(foreground.sum()))
            onehot = torch.zeros_like(logits)
            onehot[foreground, target["labels"][matched[foreground]]] = 1.0
            valid = matched != Matcher.BETWEEN_THRESHOLDS
            classification.append(sigmoid_focal_loss(logits[valid], onehot[valid], reduction="sum"))
            goal = box_coder.encode_single(target["boxes"][matched[foreground]], anchor[foreground])
            regression.append(F.l1_loss(deltas[foreground], goal, reduction="sum"))
        return {"classification": sum(classification) / positives, "bbox_regression": sum(regression) / positives}


class ForegroundRetinaNet(RetinaNet):
    """torchvision's RetinaNet with one sigmoid output per foreground class, mmdetection's layout.

    Targets' labels ``1..K`` (the project's detection label contract, 0 being the background of Mask R-CNN) are
    trained as class indices ``0..K-1`` and detections report ``1..K``: a background label cannot be predicted.
    Built with :class:`PooledLossRetinaNetHead` and :func:`octave_anchor_generator` unless given others.
    """

    def __init__(self, backbone: Any, num_classes: int, **kwargs: Any) -> None:
        kwargs.setdefault("anchor_generator", octave_anchor_generator())
        if "head" not in kwargs:
            anchors = kwargs["anchor_generator"].num_anchors_per_location()[0]
            kwargs["head"] = PooledLossRetinaNetHead(backbone.out_channels, anchors, num_classes)
        super().__init__(backbone, num_classes=num_classes, **kwargs)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)
        if self.training:
            return out
        return [{**d, "labels": d["labels"] + 1} for d in out]
