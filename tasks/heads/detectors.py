"""torchvision's RetinaNet and Mask R-CNN on a :class:`~tasks.heads.feature_pyramid.TimmFeaturePyramid`.

The detectors are torchvision's, unchanged. Only their input transform is replaced: in Strata the datamodule owns
resizing (albumentations, the same pipeline for boxes and masks), so the model must not resize again; it still
normalises with the backbone's mean/std and pads the batch to a multiple of 32. Predictions come back in the
coordinates of the original image files, whose sizes the task passes with :meth:`DatamoduleSizedTransform.output_sizes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .feature_pyramid import TimmFeaturePyramid

__all__ = ["DETECTORS", "DatamoduleSizedTransform", "build_detector"]

DETECTORS = ("retinanet", "maskrcnn")


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
    freeze_bn: bool = False,
    frozen_stages: int = -1,
    backbone_kwargs: dict[str, Any] | None = None,
    detector_kwargs: dict[str, Any] | None = None,
    roi_head_width: int | None = None,
) -> nn.Module:
    """RetinaNet (arXiv 1708.02002) or Mask R-CNN (arXiv 1703.06870) for ``num_classes`` foreground classes.

    Labels are ``1..num_classes`` (0 is background), so the heads get ``num_classes + 1`` outputs. RetinaNet uses
    levels 1-3 (strides 8-32) with P6/P7 (the papers' ``start_level=1``), Mask R-CNN levels 0-3 with a max-pooled P6.

    Args:
        detector: ``"retinanet"`` or ``"maskrcnn"``.
        backbone: timm model name.
        num_classes: foreground classes.
        image_mean: normalisation mean (RGB, 0-1), usually the backbone's ``pretrained_cfg["mean"]``.
        image_std: normalisation std.
        out_indices: backbone levels for the FPN; None for the detector's default.
        fpn_channels: FPN width.
        level_norm: ``LayerNorm2d`` per backbone level before the FPN.
        freeze_bn: frozen BatchNorm in the backbone.
        frozen_stages: backbone levels frozen (-1: none).
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
        freeze_bn=freeze_bn,
        frozen_stages=frozen_stages,
        **(backbone_kwargs or {}),
    )
    kwargs = dict(detector_kwargs or {})
    if roi_head_width is not None and not retina:
        width, classes, pooled = roi_head_width, num_classes + 1, fpn_channels * 7 * 7
        kwargs.update(
            box_head=TwoMLPHead(pooled, 4 * width),
            box_predictor=FastRCNNPredictor(4 * width, classes),
            mask_head=MaskRCNNHeads(fpn_channels, [width] * 4, 1),
            mask_predictor=MaskRCNNPredictor(width, width, classes),
        )
    model = (RetinaNet if retina else MaskRCNN)(
        pyramid, num_classes=None if "box_predictor" in kwargs else num_classes + 1, **kwargs
    )
    model.transform = DatamoduleSizedTransform(image_mean, image_std)
    return model
