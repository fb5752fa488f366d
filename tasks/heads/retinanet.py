"""RetinaNet as mmdetection 2.x's ``RetinaHead`` trains it, on torchvision's ``RetinaNet``.

Lin et al., "Focal Loss for Dense Object Detection" (arXiv 1708.02002). torchvision's model differs from mmdetection's
``retinanet_r50_fpn.py`` (the base of BiFormer's RetinaNet config) in three places, fixed here:

- classes: mmdet has one sigmoid output per foreground class; torchvision indexes its outputs by label, so the
  project's labels ``1..K`` would need a dead background column (which can then be predicted as label 0);
- loss normalisation: mmdet divides the summed focal and L1 losses of the whole batch by the batch's positives
  (``num_total_pos = sum_i max(pos_i, 1)``, ``anchor_head.py``); torchvision divides per image and then averages over
  images, which weights images with few objects more;
- anchor sizes: mmdet's octave scales ``4 * stride * 2 ** (k / 3)``; torchvision truncates them to integers
  (40 and 50 instead of 40.3 and 50.8 at stride 8) and rounds the corners (``octave_anchor_generator``);
- test-time candidates: mmdet keeps the top ``nms_pre`` anchors of each level by their best class score and then
  every (anchor, class) pair above ``score_thr`` (``AnchorHead._get_bboxes`` + ``multiclass_nms``); torchvision keeps
  the top ``topk_candidates`` (anchor, class) pairs above the threshold.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import batched_nms, clip_boxes_to_image, sigmoid_focal_loss

from .anchors_and_assigners import octave_anchor_generator

__all__ = ["ForegroundRetinaNet", "PooledLossRetinaNetHead"]


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

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """mmdet's test-time selection: per level the ``topk_candidates`` anchors with the highest best-class score,
        then every (anchor, class) pair of them above ``score_thresh``, class-wise NMS over all levels, the
        ``detections_per_img`` best. Labels are class indices here (``forward`` adds 1)."""
        detections = []
        for index, image_shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            for logits, deltas, level_anchors in zip(
                head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors[index]
            ):
                level_scores, level_deltas = logits[index].sigmoid(), deltas[index]
                if level_scores.shape[0] > self.topk_candidates:
                    top = level_scores.max(dim=1).values.topk(self.topk_candidates).indices
                    level_scores, level_deltas, level_anchors = level_scores[top], level_deltas[top], level_anchors[top]
                decoded = clip_boxes_to_image(self.box_coder.decode_single(level_deltas, level_anchors), image_shape)
                anchor_index, label = torch.where(level_scores > self.score_thresh)
                boxes.append(decoded[anchor_index])
                scores.append(level_scores[anchor_index, label])
                labels.append(label)
            boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_nms(boxes_t, scores_t, labels_t, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes_t[keep], "scores": scores_t[keep], "labels": labels_t[keep]})
        return detections

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)
        if self.training:
            return out
        return [{**d, "labels": d["labels"] + 1} for d in out]
