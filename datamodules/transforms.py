"""Albumentations pipelines for classification: the DeiT/timm training recipe and the timm-style eval resize-crop.

Training: RandomResizedCrop(scale 0.08-1, bicubic) -> horizontal flip -> optional RandAugment-strength policy ->
Normalize -> optional random erasing -> CHW tensor. Eval: resize the short side to ``img_size / crop_pct`` -> centre
crop ``img_size`` -> Normalize -> CHW tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets
from albumentations.pytorch import ToTensorV2
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "INTERPOLATIONS",
    "KeepRatioResize",
    "build_detection_transform",
    "build_eval_transform",
    "build_train_transform",
    "rand_augment_policy",
]

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

_MAX_MAGNITUDE = 10.0


def _interpolation(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}: use one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def _parse_rand_augment(spec: str) -> tuple[int, float, float]:
    """Parse timm's RandAugment spec ``rand-m9-n2-mstd0.5`` into (num_ops, magnitude, magnitude_std)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment {spec!r} must start with 'rand-', e.g. 'rand-m9-mstd0.5-inc1'")
    num_ops, magnitude, magnitude_std = 2, 9.0, 0.0
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|m|n|inc|w|p)([\d.]+)", part)
        if match is None:
            raise ValueError(f"rand_augment {spec!r}: cannot parse {part!r} (expected m<int>, n<int>, mstd<float>)")
        key, value = match.groups()
        if key == "m":
            magnitude = float(value)
        elif key == "n":
            num_ops = int(value)
        elif key == "mstd":
            magnitude_std = float(value)
    return num_ops, magnitude, magnitude_std


def rand_augment_policy(spec: str, fill: tuple[int, int, int] = (124, 116, 104)) -> A.BaseCompose:
    """A RandAugment-strength policy (Cubuk et al., arXiv 1909.13719) expressed with albumentations ops.

    ``spec`` uses timm's syntax (``rand-m9-mstd0.5-inc1``): ``n`` ops drawn uniformly per image, each at magnitude
    ``m`` out of 10 (timm's "increasing" variants: a stronger magnitude always means a stronger distortion). The
    magnitude noise ``mstd`` is approximated by sampling each op's strength from ``[0, m]`` when ``mstd > 0``.
    """
    num_ops, magnitude, magnitude_std = _parse_rand_augment(spec)
    m = min(magnitude, _MAX_MAGNITUDE) / _MAX_MAGNITUDE
    low = 0.0 if magnitude_std > 0 else m

    def span(high: float) -> tuple[float, float]:
        return (low * high, m * high)

    def sym(high: float) -> tuple[float, float]:
        return (-m * high, m * high)

    ops = [
        A.Affine(rotate=sym(30.0), fill=fill, p=1.0),
        A.Affine(shear={"x": sym(17.0), "y": (0, 0)}, fill=fill, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": sym(17.0)}, fill=fill, p=1.0),
        A.Affine(translate_percent={"x": sym(0.45), "y": (0, 0)}, fill=fill, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": sym(0.45)}, fill=fill, p=1.0),
        A.ColorJitter(brightness=span(0.9), contrast=0, saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=span(0.9), saturation=0, hue=0, p=1.0),
        A.ColorJitter(brightness=0, contrast=0, saturation=span(0.9), hue=0, p=1.0),
        A.Sharpen(alpha=(0.0, max(m * 0.9, 1e-3)), lightness=(1.0, 1.0), p=1.0),
        A.Posterize(num_bits=(max(1, round(8 - 4 * m)), 8), p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.Equalize(p=1.0),
        A.AutoContrast(p=1.0),
        A.InvertImg(p=1.0),
    ]
    return A.SomeOf(ops, n=num_ops, replace=True, p=1.0)


def build_train_transform(
    img_size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    rand_augment: str | None = None,
    random_erasing: float = 0.0,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> A.Compose:
    """The DeiT/timm training pipeline on HWC uint8 RGB arrays; returns a float CHW tensor."""
    steps: list = [
        A.RandomResizedCrop(
            size=(img_size, img_size), scale=scale, ratio=ratio, interpolation=_interpolation(interpolation)
        ),
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if rand_augment:
        steps.append(rand_augment_policy(rand_augment, fill=tuple(round(255 * x) for x in mean)))
    steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    if random_erasing > 0:
        # NOTE: timm's RandomErasing fills with per-pixel normal noise after normalisation ("pixel" mode).
        steps.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random_uniform", p=random_erasing))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def build_eval_transform(
    img_size: int,
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> A.Compose:
    """timm's eval pipeline: short side to ``floor(img_size / crop_pct)``, centre crop, normalise, CHW tensor."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    scale_size = math.floor(img_size / crop_pct)
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=scale_size, interpolation=_interpolation(interpolation)),
            A.CenterCrop(height=img_size, width=img_size),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


# NOTE: the ImageNet mean in 0-255, so LSJ padding is ~0 after the detector normalises (mmdet pads after Normalize).
_PAD_FILL = (124.0, 116.0, 104.0)


class KeepRatioResize(A.DualTransform):
    """Aspect-preserving resize into a (long, short) budget: mmdetection's ``Resize(keep_ratio=True)``.

    "MMDetection: Open MMLab Detection Toolbox and Benchmark" (Chen et al., arXiv 1906.07155):
    ``scale = r * min(long_max / max(H, W), short_max / min(H, W))``, output ``(round(H * scale), round(W * scale))``.
    ``short_max`` may be a list, one value drawn per image (the multi-scale training of DETR/mmdet); ``r`` is drawn
    uniformly from ``ratio_range`` (large-scale jitter; else 1).
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
        scale = ratio * min(self.long_max / max(height, width), short / min(height, width))
        return {"scale": scale, "resized_hw": (max(1, round(height * scale)), max(1, round(width * scale)))}

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
