"""Albumentations pipelines for detection (keep-ratio resize, large-scale jitter, flip) and OpenCV interpolations.

The classification transforms are timm's own, in ``datamodules.classification_transforms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets

__all__ = [
    "INTERPOLATIONS",
    "KeepRatioResize",
    "build_detection_transform",
]

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


# NOTE: the ImageNet mean in 0-255, so LSJ padding is ~0 after the detector normalises (mmdet pads after Normalize).
_PAD_FILL = (124.0, 116.0, 104.0)


class KeepRatioResize(A.DualTransform):
    """Aspect-preserving resize into a (long, short) budget: mmdetection's ``Resize(keep_ratio=True)``.

    "MMDetection: Open MMLab Detection Toolbox and Benchmark" (Chen et al., arXiv 1906.07155), with mmcv 1.x's
    arithmetic (``random_sample_ratio`` then ``imrescale``): ``scale = min(int(r * long_max) / max(H, W),
    int(r * short_max) / min(H, W))``, output ``(int(H * scale + 0.5), int(W * scale + 0.5))``. ``short_max`` may be a
    list, one value drawn per image (the multi-scale training of DETR/mmdet); ``r`` is drawn uniformly from
    ``ratio_range`` (mmseg's random rescale, large-scale jitter; else 1).
    Image ``(H, W, C)`` bilinear, masks ``(H, W)`` nearest; boxes are scale-invariant in albumentations' normalised
    coordinates. The chosen ``scale`` and ``resized_hw`` are the transform's applied parameters.

    Args:
        long_max: bound on the long side.
        short_max: bound on the short side, or the values to draw it from.
        ratio_range: range of the extra random factor ``r``.
        interpolation: OpenCV interpolation for the image.
        p: probability of applying the transform.
    """

    _targets = (Targets.IMAGE, Targets.MASK, Targets.BBOXES)

    def __init__(
        self,
        long_max: int,
        short_max: int | Sequence[int],
        ratio_range: tuple[float, float] = (1.0, 1.0),
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.long_max = long_max
        self.short_max = [short_max] if isinstance(short_max, int) else list(short_max)
        self.ratio_range = tuple(ratio_range)
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        short = self.py_random.choice(self.short_max)
        ratio = self.py_random.uniform(*self.ratio_range)
        # NOTE: mmdet/mmseg's random_sample_ratio truncates the bounds, mmcv's _scale_size rounds half up
        long_bound, short_bound = int(self.long_max * ratio), int(short * ratio)
        scale = min(long_bound / max(height, width), short_bound / min(height, width))
        return {"scale": scale, "resized_hw": (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))}

    def apply(self, img: np.ndarray, resized_hw: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, resized_hw[::-1], interpolation=self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, resized_hw: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, resized_hw[::-1], interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("long_max", "short_max", "ratio_range", "interpolation")


def build_detection_transform(
    img_scale: tuple[int, int],
    *,
    train: bool,
    multi_scale: Sequence[int] | None = None,
    large_scale_jitter: tuple[float, float] | None = None,
    hflip: float = 0.5,
) -> A.Compose:
    """Detection pipeline on HWC uint8 RGB arrays with ``bboxes`` (``pascal_voc``), ``instance_ids`` and ``masks``.

    Eval: keep-ratio resize into ``img_scale = (long, short)``. Train: the same resize with the short bound drawn from
    ``multi_scale`` when given, or large-scale jitter ("Simple Copy-Paste is a Strong Data Augmentation Method for
    Instance Segmentation", Ghiasi et al., arXiv 2012.07177: keep-ratio resize times ``r ~ U(large_scale_jitter)``,
    then a random ``short x long`` (H x W) crop, padded at the bottom/right where the image is smaller; the papers use a
    square ``img_scale`` such as (1024, 1024)); then a horizontal flip.
    """
    long_max, short_max = (int(v) for v in img_scale)
    steps: list = []
    if train and large_scale_jitter is not None:
        steps.append(KeepRatioResize(long_max, short_max, ratio_range=tuple(large_scale_jitter)))
        steps.append(
            A.RandomCrop(short_max, long_max, pad_if_needed=True, pad_position="top_left", fill=_PAD_FILL, fill_mask=0)
        )
    else:
        steps.append(KeepRatioResize(long_max, list(multi_scale) if train and multi_scale else short_max))
    if train and hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["instance_ids"], clip=True),
        save_applied_params=True,
    )
