"""Mask R-CNN's parts as mmdetection 2.x's ``mask_rcnn_r50_fpn.py`` has them, in torchvision's interfaces.

He et al., "Mask R-CNN" (arXiv 1703.06870). Around torchvision's ``MaskRCNN``, where its own parts differ from
mmdet's (the base of BiFormer's Mask R-CNN config):

- RoI pooling: mmdet's ``SingleRoIExtractor`` (:class:`RoIExtractor`), where torchvision's ``MultiScaleRoIAlign``
  hard-codes ``aligned=False`` and samples 2 points per bin;
- the box losses: mmdet's L1 (``loss_bbox=dict(type='L1Loss')`` for the RPN and the R-CNN head), where torchvision
  hard-codes smooth L1 with ``beta = 1/9`` (measured on the demo detector after training: 95 % of the RPN's and 43 %
  of the R-CNN's positive box deltas lie within 1/9 of their targets, where smooth L1's gradient is smaller);
- the assigners: :class:`~tasks.heads.anchors_and_assigners.MaxIoUAssigner` (set by ``build_detector``);
- the box head's initialisation (:func:`init_box_head_as_mmdet`); the RPN and mask heads already match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align

__all__ = ["L1RegionProposalNetwork", "L1RoIHeads", "RoIExtractor", "init_box_head_as_mmdet", "l1_box_loss"]


class RoIExtractor(MultiScaleRoIAlign):
    """RoI features from a feature pyramid as mmdetection's ``SingleRoIExtractor`` with mmcv's ``RoIAlign``.

    FPN paper (Lin et al., arXiv 1612.03144, eq. 1) in mmdet's form: a box of size ``w x h`` is pooled from level
    ``l = clamp(floor(log2(sqrt(w h) / finest_scale + 1e-6)), 0, L - 1)`` by RoIAlign (He et al., arXiv 1703.06870)
    at ``spatial_scale = 1 / stride_l`` with ``aligned=True`` (pixel centres at +0.5, mmcv's default) and
    ``sampling_ratio=0`` (adaptive: ``ceil(roi_size / output_size)`` points per bin). Called as torchvision's
    ``MultiScaleRoIAlign`` (whose subclass it is, so torchvision's detectors accept it): ``(features: dict,
    boxes: list[(N_i, 4)], image_shapes) -> (sum N_i, C, S, S)``.

    Args:
        featmap_names: the pyramid levels pooled from, finest first.
        output_size: ``S`` (7 for boxes, 14 for masks).
        strides: the stride of each level.
        sampling_ratio: points per bin side (0: adaptive).
        finest_scale: box scale mapped to the finest level (mmdet: 56).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        strides: Sequence[int],
        sampling_ratio: int = 0,
        finest_scale: float = 56.0,
    ) -> None:
        if len(featmap_names) != len(strides):
            raise ValueError(f"{len(featmap_names)} feature maps but {len(strides)} strides")
        super().__init__(list(featmap_names), int(output_size), int(sampling_ratio))
        self.strides = [int(s) for s in strides]
        self.finest_scale = float(finest_scale)

    def roi_levels(self, rois: Tensor) -> Tensor:
        """The pyramid level of each ``(N, 5)`` RoI ``(batch index, x1, y1, x2, y2)``."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(  # type: ignore[override]
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feats = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        levels = self.roi_levels(rois)
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            index = torch.where(levels == level)[0]
            if len(index):
                pooled = roi_align(feat, rois[index], self.output_size, 1.0 / stride, self.sampling_ratio, aligned=True)
                out[index] = pooled.to(out.dtype)
        return out


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN (Ren et al., arXiv 1506.01497) with mmdet's losses on its sampled anchors ``S`` (256 per
    image, half positive at most): ``BCE(objectness_S, labels_S)`` averaged over ``S`` and
    ``sum_{a in S+} |delta_a - t_a|_1 / |S|`` (torchvision: smooth L1, ``beta = 1/9``, same normalisation)."""

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork) -> L1RegionProposalNetwork:
        """The same RPN (its modules, thresholds and proposal counts) with these losses."""
        return cls(
            rpn.anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
        )

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        positives, negatives = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positives))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(negatives))[0]])
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], targets[positive], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss


def l1_box_loss(box_regression: Tensor, labels: list[Tensor], regression_targets: list[Tensor]) -> Tensor:
    """mmdet's R-CNN box loss: ``sum over positive RoIs of |delta[class] - t|_1 / (sampled RoIs)``."""
    labels_t, targets = torch.cat(labels), torch.cat(regression_targets)
    positive = torch.where(labels_t > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[positive, labels_t[positive]]
    return F.l1_loss(deltas, targets[positive], reduction="sum") / labels_t.numel()


class L1RoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with mmdet's L1 box loss (:func:`l1_box_loss`) in place of its smooth L1.

    torchvision computes the box loss inside ``forward``; this subclass keeps what ``forward`` sampled (the labels
    and regression targets of ``select_training_samples``, the predictor's output) and replaces ``loss_box_reg``
    with the L1 loss of the same tensors, so the classification and mask losses are torchvision's unchanged.
    """

    @classmethod
    def from_torchvision(cls, heads: RoIHeads) -> L1RoIHeads:
        """The same heads (modules, thresholds, samplers) with this box loss."""
        new = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool,
            mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
        )
        new.proposal_matcher = heads.proposal_matcher
        return new

    def select_training_samples(self, proposals: list[Tensor], targets: Any) -> Any:
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled[2], sampled[3]  # NOTE: labels, regression targets, read back in forward
        return sampled

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        predicted: list[tuple[Tensor, Tensor]] = []
        hook = self.box_predictor.register_forward_hook(lambda module, args, output: predicted.append(output))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        labels, regression_targets = self._sampled
        self._sampled = None
        losses["loss_box_reg"] = l1_box_loss(predicted[0][1], labels, regression_targets)
        return result, losses


def init_box_head_as_mmdet(heads: RoIHeads) -> None:
    """mmdet's ``Shared2FCBBoxHead`` initialisation: Xavier-uniform shared FCs, classifier ``N(0, 0.01)``, box
    regressor ``N(0, 0.001)``, zero biases (torchvision keeps PyTorch's default ``Linear`` initialisation)."""
    for fc in (heads.box_head.fc6, heads.box_head.fc7):
        torch.nn.init.xavier_uniform_(fc.weight)
        torch.nn.init.zeros_(fc.bias)
    for layer, std in ((heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001)):
        torch.nn.init.normal_(layer.weight, 0.0, std)
        torch.nn.init.zeros_(layer.bias)
