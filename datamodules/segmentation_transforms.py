"""The mmsegmentation ADE20K training pipeline as albumentations transforms.

``CatMaxRatioCrop`` and ``PhotoMetricDistortion`` are mmseg's ``RandomCrop(cat_max_ratio=...)`` and
``PhotoMetricDistortion``, which albumentations does not ship in that form; ``build_segmentation_transform`` chains
them with the keep-ratio resize of ``datamodules.detection_transforms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .detection_transforms import KeepRatioResize

__all__ = ["IGNORE_INDEX", "CatMaxRatioCrop", "PhotoMetricDistortion", "build_segmentation_transform"]

IGNORE_INDEX = 255
_CROP_TRIES = 10


class CatMaxRatioCrop(A.DualTransform):
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)`` for semantic segmentation.

    "MMSegmentation: OpenMMLab Semantic Segmentation Toolbox and Benchmark" (2020); the recipe of "Unified Perceptual
    Parsing for Scene Understanding" (Xiao et al., arXiv 1807.10221). A ``min(H, h) x min(W, w)`` window is drawn
    uniformly; while no class owns at most ``cat_max_ratio`` of the window's non-ignored label pixels
    (``max_c n_c / sum_c n_c < cat_max_ratio`` with at least two classes), another window is drawn, up to 10 tries in
    all, the last one being kept. Image ``(H, W, C)`` and mask ``(H, W)`` are cut at the same window.

    Args:
        height: crop height.
        width: crop width.
        cat_max_ratio: the largest share of one class; 1 disables the retries.
        ignore_index: the label value left out of the class counts.
        p: probability of applying the transform.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(
        self, height: int, width: int, cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        self.height = height
        self.width = width
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _window(self, height: int, width: int) -> tuple[int, int, int, int]:
        y0 = self.py_random.randint(0, max(height - self.height, 0))
        x0 = self.py_random.randint(0, max(width - self.width, 0))
        return y0, x0, y0 + min(height, self.height), x0 + min(width, self.width)

    def _balanced(self, mask: np.ndarray) -> bool:
        _, counts = np.unique(mask[mask != self.ignore_index], return_counts=True)
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        window = self._window(height, width)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(_CROP_TRIES - 1):
                y0, x0, y1, x1 = window
                if self._balanced(mask[y0:y1, x0:x1]):
                    break
                window = self._window(height, width)
        return {"window": window}

    def apply(self, img: np.ndarray, window: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        y0, x0, y1, x1 = window
        return img[y0:y1, x0:x1]

    def apply_to_mask(self, mask: np.ndarray, window: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        y0, x0, y1, x1 = window
        return mask[y0:y1, x0:x1]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index")


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg's ``PhotoMetricDistortion`` on uint8 RGB images (after SSD, Liu et al., arXiv 1512.02325).

    Each with probability 1/2: brightness ``x + d``, ``d ~ U(-32, 32)``; contrast ``x * a``, ``a ~ U(0.5, 1.5)``
    (applied first or last, with equal chance); saturation ``S * a`` in HSV, ``a ~ U(0.5, 1.5)``; hue ``(H + d) mod
    180`` in OpenCV's half-degree units, ``d`` an integer in ``[-18, 18]``. Every step clips to ``[0, 255]`` and rounds
    down to uint8 as mmseg does. Image ``(H, W, 3)`` in, same shape out.

    Args:
        brightness_delta: the largest brightness shift.
        contrast_range: range of the contrast factor.
        saturation_range: range of the saturation factor.
        hue_delta: the largest hue shift.
        p: probability of applying the transform.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def get_params(self) -> dict[str, Any]:
        rnd = self.py_random

        def maybe(value: float) -> float | None:
            return value if rnd.random() < 0.5 else None

        return {
            "brightness": maybe(rnd.uniform(-self.brightness_delta, self.brightness_delta)),
            "contrast_first": rnd.random() < 0.5,
            "contrast": maybe(rnd.uniform(*self.contrast_range)),
            "saturation": maybe(rnd.uniform(*self.saturation_range)),
            "hue": maybe(rnd.randint(-self.hue_delta, self.hue_delta)),
        }

    @staticmethod
    def _affine(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None = None,
        contrast_first: bool = True,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: int | None = None,
        **params: Any,
    ) -> np.ndarray:
        if brightness is not None:
            img = self._affine(img, beta=brightness)
        if contrast is not None and contrast_first:
            img = self._affine(img, alpha=contrast)
        if saturation is not None or hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            if saturation is not None:
                hsv[..., 1] = self._affine(hsv[..., 1], alpha=saturation)
            if hue is not None:
                hsv[..., 0] = (hsv[..., 0].astype(np.int32) + hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            img = self._affine(img, alpha=contrast)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


class AlignResize(A.ImageOnlyTransform):
    """The test-time ``AlignResize`` of BiFormer's / UniFormer's Semantic FPN configs
    (``mmseg_custom/align_resize.py``): after the keep-ratio resize the image is resized once more, bilinearly, to
    ``(ceil(H / d) d, ceil(W / d) d)``, so that both sides are multiples of ``d``.

    Args:
        size_divisor: ``d``.
        p: probability of applying the transform.
    """

    def __init__(self, size_divisor: int = 32, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size_divisor = int(size_divisor)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        d = self.size_divisor
        aligned = (-(-height // d) * d, -(-width // d) * d)
        if aligned == (height, width):
            return img
        return cv2.resize(img, aligned[::-1], interpolation=cv2.INTER_LINEAR)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size_divisor",)


def build_segmentation_transform(
    *,
    train: bool,
    crop_size: int = 512,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    photometric: bool = True,
    eval_short_side: int = 512,
    eval_size_divisor: int | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> A.Compose:
    """The mmseg ADE20K pipeline on an HWC uint8 RGB ``image`` and an ``(H, W)`` uint8 ``mask`` of reduced labels.

    Train: keep-ratio resize into ``scale = (long, short)`` times ``r ~ U(ratio_range)`` (image bilinear, mask
    nearest) -> ``CatMaxRatioCrop`` -> horizontal flip -> ``PhotoMetricDistortion`` -> normalise -> pad bottom/right
    to ``crop_size`` (image 0, mask 255). Eval: keep-ratio resize into ``(long, eval_short_side)`` (-> ``AlignResize``
    to multiples of ``eval_size_divisor`` when given) -> normalise (the caller leaves the mask out).
    """
    long_max = max(scale)
    normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
    if not train:
        align = [AlignResize(eval_size_divisor)] if eval_size_divisor else []
        return A.Compose([KeepRatioResize(long_max, eval_short_side), *align, normalize])
    steps: list = [
        KeepRatioResize(long_max, min(scale), ratio_range=tuple(ratio_range)),
        CatMaxRatioCrop(crop_size, crop_size, cat_max_ratio=cat_max_ratio),
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        normalize,
        A.PadIfNeeded(
            crop_size, crop_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX
        ),
    ]
    return A.Compose(steps)
