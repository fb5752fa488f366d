"""torchvision's RetinaNet and Mask R-CNN on a :class:`~tasks.heads.feature_pyramid.TimmFeaturePyramid`, set up as
mmdetection 2.x's ``retinanet_r50_fpn`` / ``mask_rcnn_r50_fpn`` (the bases of BiFormer's COCO configs).

The detectors are torchvision's. Replaced around them, where torchvision cannot be configured to mmdet's behaviour:

- the input transform: in Strata the datamodule owns resizing (albumentations, the same pipeline for boxes and
  masks), so the model must not resize again; it still normalises with the backbone's mean/std and pads the batch to
  a multiple of 32. Predictions come back in the coordinates of the original image files, whose sizes the task passes
  with :meth:`DatamoduleSizedTransform.output_sizes`;
- Mask R-CNN's RoI pooling and box losses: ``tasks/heads/mask_rcnn.py``;
- RetinaNet's classes, loss normalisation and test-time candidates: ``tasks/heads/retinanet.py``;
- anchors (exact, not rounded to whole pixels) and the assigners (mmdet's ``MaxIoUAssigner``:
  ``tasks/heads/anchors_and_assigners.py``).

Defaults are mmdet's ``train_cfg``/``test_cfg`` values (``MMDET_DEFAULTS``), not torchvision's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .anchors_and_assigners import ExactAnchorGenerator, MaxIoUAssigner
from .feature_pyramid import TimmFeaturePyramid
from .mask_rcnn import L1RegionProposalNetwork, L1RoIHeads, RoIExtractor, init_box_head_as_mmdet
from .retinanet import ForegroundRetinaNet

__all__ = ["DETECTORS", "MMDET_ASSIGNERS", "MMDET_DEFAULTS", "DatamoduleSizedTransform", "build_detector"]

DETECTORS = ("retinanet", "maskrcnn")

# NOTE: mmdet 2.x retinanet_r50_fpn.py / mask_rcnn_r50_fpn.py train_cfg and test_cfg, in torchvision's argument names
MMDET_DEFAULTS: dict[str, dict[str, Any]] = {
    "retinanet": {
        "fg_iou_thresh": 0.5,  # assigner pos_iou_thr
        "bg_iou_thresh": 0.4,  # assigner neg_iou_thr
        "topk_candidates": 1000,  # test nms_pre
        "score_thresh": 0.05,  # test score_thr
        "nms_thresh": 0.5,  # test nms iou_threshold
        "detections_per_img": 100,  # test max_per_img (torchvision: 300)
    },
    "maskrcnn": {
        "rpn_fg_iou_thresh": 0.7,
        "rpn_bg_iou_thresh": 0.3,
        "rpn_batch_size_per_image": 256,
        "rpn_positive_fraction": 0.5,
        "rpn_pre_nms_top_n_train": 2000,  # rpn_proposal nms_pre
        "rpn_post_nms_top_n_train": 1000,  # rpn_proposal max_per_img (torchvision: 2000)
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "rpn_nms_thresh": 0.7,
        "box_fg_iou_thresh": 0.5,
        "box_bg_iou_thresh": 0.5,
        "box_batch_size_per_image": 512,
        "box_positive_fraction": 0.25,
        "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5,
        "box_detections_per_img": 100,
    },
}


# NOTE: min_pos_iou of mmdet's MaxIoUAssigner for each stage (retinanet_r50_fpn.py, mask_rcnn_r50_fpn.py)
MMDET_ASSIGNERS: dict[str, float] = {"retinanet": 0.0, "rpn": 0.3, "rcnn": 0.5}


class DatamoduleSizedTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` without its resize: ``x -> (x - mean) / std``, padded to ``size_divisible``.

    ``postprocess`` maps boxes (and pastes masks) from the network input size to ``output_sizes`` when given, else
    leaves them at the input size.
    """

    def __init__(self, image_mean: Sequence[float], image_std: Sequence[float], size_divisible: int = 32) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=list(image_mean), image_std=list(image_std))
        self.size_divisible = size_divisible
        self._output_sizes: list[tuple[int, int]] | None = None

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, Any]:
        return image, target

    @contextmanager
    def output_sizes(self, sizes: Sequence[tuple[int, int]]) -> Iterator[None]:
        """Within the block, predictions are returned at ``sizes`` (one ``(height, width)`` per image)."""
        self._output_sizes = [(int(h), int(w)) for h, w in sizes]
        try:
            yield
        finally:
            self._output_sizes = None

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self._output_sizes is not None:
            if len(self._output_sizes) != len(result):
                raise ValueError(f"output_sizes has {len(self._output_sizes)} sizes for {len(result)} images")
            original_image_sizes = self._output_sizes
        return super().postprocess(result, image_shapes, original_image_sizes)


def build_detector(
    detector: str,
    backbone: str,
    num_classes: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    out_indices: Sequence[int] | None = None,
    fpn_channels: int = 256,
    level_norm: bool = True,
    norm_eval: bool = False,
    freeze_bn: bool = False,
    frozen_stages: int = -1,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    detector_kwargs: dict[str, Any] | None = None,
    roi_head_width: int | None = None,
) -> nn.Module:
    """RetinaNet (arXiv 1708.02002) or Mask R-CNN (arXiv 1703.06870) for ``num_classes`` foreground classes.

    Labels are ``1..num_classes``: Mask R-CNN's softmax heads get ``num_classes + 1`` outputs (0 is background),
    RetinaNet's sigmoid head ``num_classes`` (``tasks/heads/retinanet.py``). RetinaNet uses levels 1-3 (strides 8-32)
    with P6/P7 on C5 (the papers' ``start_level=1``, ``add_extra_convs='on_input'``), Mask R-CNN levels 0-3 with a
    max-pooled P6 and :class:`RoIExtractor` pooling. ``detector_kwargs`` override ``MMDET_DEFAULTS``.

    Args:
        detector: ``"retinanet"`` or ``"maskrcnn"``.
        backbone: timm model name.
        num_classes: foreground classes.
        image_mean: normalisation mean (RGB, 0-1), usually the backbone's ``pretrained_cfg["mean"]``.
        image_std: normalisation std.
        out_indices: backbone levels for the FPN; None for the detector's default.
        fpn_channels: FPN width.
        level_norm: ``LayerNorm2d`` per backbone level before the FPN.
        norm_eval: BatchNorm statistics of the backbone fixed in training (mmdet ``norm_eval``).
        freeze_bn: frozen BatchNorm in the backbone (statistics and affine).
        frozen_stages: backbone levels frozen (-1: none).
        pretrained: start the backbone from its default pretrained weights.
        pretrained_file: start the backbone from this local weights file.
        backbone_kwargs: ``timm.create_model`` kwargs.
        detector_kwargs: torchvision detector kwargs (``score_thresh``, ``detections_per_img``, anchor generator...).
        roi_head_width: Mask R-CNN only: width of the mask head's four convs (box MLP: 4x this); None keeps the
            papers' 256 / 1024. Small widths make CPU training practical.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector={detector!r} must be one of {DETECTORS}")
    retina = detector == "retinanet"
    pyramid = TimmFeaturePyramid(
        backbone,
        out_indices=tuple(out_indices if out_indices is not None else ((1, 2, 3) if retina else (0, 1, 2, 3))),
        out_channels=fpn_channels,
        extra_blocks="p6p7" if retina else "maxpool",
        level_norm=level_norm,
        norm_eval=norm_eval,
        freeze_bn=freeze_bn,
        frozen_stages=frozen_stages,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
        **(backbone_kwargs or {}),
    )
    kwargs = {**MMDET_DEFAULTS[detector], **(detector_kwargs or {})}
    if retina:
        model: nn.Module = ForegroundRetinaNet(pyramid, num_classes=num_classes, **kwargs)
        matcher = model.proposal_matcher
        model.proposal_matcher = MaxIoUAssigner(
            matcher.high_threshold, matcher.low_threshold, MMDET_ASSIGNERS["retinanet"]
        )
    else:
        sizes = ((32,), (64,), (128,), (256,), (512,))  # mmdet AnchorGenerator(scales=[8], strides 4-64)
        kwargs.setdefault("rpn_anchor_generator", ExactAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)))
        reductions = pyramid.body.feature_info.reduction()
        strides = [int(r) for r in reductions]
        names = [str(i) for i in range(len(strides))]
        kwargs.setdefault("box_roi_pool", RoIExtractor(names, 7, strides))
        kwargs.setdefault("mask_roi_pool", RoIExtractor(names, 14, strides))
        if roi_head_width is not None:
            width, classes, pooled = roi_head_width, num_classes + 1, fpn_channels * 7 * 7
            kwargs.update(
                box_head=TwoMLPHead(pooled, 4 * width),
                box_predictor=FastRCNNPredictor(4 * width, classes),
                mask_head=MaskRCNNHeads(fpn_channels, [width] * 4, 1),
                mask_predictor=MaskRCNNPredictor(width, width, classes),
            )
        model = MaskRCNN(pyramid, num_classes=None if "box_predictor" in kwargs else num_classes + 1, **kwargs)
        model.rpn = L1RegionProposalNetwork.from_torchvision(model.rpn)
        model.roi_heads = L1RoIHeads.from_torchvision(model.roi_heads)
        init_box_head_as_mmdet(model.roi_heads)
        for stage, part in (("rpn", model.rpn), ("rcnn", model.roi_heads)):
            matcher = part.proposal_matcher
            part.proposal_matcher = MaxIoUAssigner(
                matcher.high_threshold, matcher.low_threshold, MMDET_ASSIGNERS[stage]
            )
    model.transform = DatamoduleSizedTransform(image_mean, image_std)
    return model
