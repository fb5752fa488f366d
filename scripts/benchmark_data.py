"""Data-pipeline comparison: JPEG decode + training augmentation, images/s of one worker, ours against timm's.

Ours is what a training worker of ``datamodules.imagenet.ImageNetDataModule`` runs per sample: ``decode_rgb_image``
(PIL decode to an RGB image, with the project's mode rules), ``set_random_seed`` with the sample's seed, then
``datamodules.classification_transforms.build_train_transform`` (timm's ``create_transform`` pipeline behind the swap
of the global random states). The reference is timm's ``create_transform(is_training=True)`` (torchvision transforms
on PIL images) after ``PIL.Image.open(...).convert("RGB")``, on the same files with the same recipe. ``max_abs_diff``
compares the two outputs on the first file, ours seeded with 0 and timm after seeding its global generators with 0
(0.0: the same tensor). One worker is one process on one core: torch and OpenCV are limited to one thread. The two
pipelines alternate image by image; a pass over the files gives one images/s figure per pipeline (process CPU time:
one worker, one thread), and the median over passes is reported with ``ratio = ours / timm``.

Recipes: ``demo`` (the demo config: 64x64 crop of the whole image, flip, normalise) on the demo JPEGs, and
``deit`` (RandomResizedCrop 0.08-1 bicubic, flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25,
normalise: ``configs/imagenet/deit_300e.yaml``) on generated ImageNet-sized JPEGs (500x375, quality 90).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from benchmark_common import timer
from PIL import Image
from timm.data import create_transform

from datamodules.classification_transforms import build_train_transform, with_black_posterize
from datamodules.decode import decode_rgb_image
from datamodules.image_folder import IMG_EXTENSIONS

__all__ = ["RECIPES", "compare_pipelines", "make_jpegs"]

# recipe -> (img_size, our build_train_transform kwargs, timm create_transform kwargs)
RECIPES: dict[str, tuple[int, dict, dict]] = {
    "demo": (
        64,
        dict(scale=(1.0, 1.0), ratio=(1.0, 1.0)),
        dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=None),
    ),
    "deit": (
        224,
        dict(rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25),
        dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", color_jitter=0.4),
    ),
    "basic": (224, dict(), dict(color_jitter=None)),
}


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """Write ``count`` photo-like JPEGs (smooth colour fields, edges and noise; ``size`` = (W, H)) once, reuse after."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:04d}.jpg" for i in range(count)]
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for path in paths:
        if path.exists():
            continue
        f = rng.uniform(0.005, 0.03, size=(3, 2))
        ph = rng.uniform(0, 6.3, size=3)
        base = np.stack([np.sin(f[c, 0] * xx + f[c, 1] * yy + ph[c]) for c in range(3)], axis=-1) * 80 + 128
        for _ in range(6):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
            base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
        base += rng.normal(0, 12, size=base.shape)
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def demo_jpegs(root: Path, count: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"--demo-root {root} holds no images: run the demo once (it generates data/demo) or fix it")
    return files[:: max(1, len(files) // count)][:count]


def _pipelines(recipe: str) -> dict[str, Callable[[Path, int], torch.Tensor]]:
    img_size, ours_kwargs, timm_kwargs = RECIPES[recipe]
    ours_tf = build_train_transform(img_size, interpolation="bicubic", **ours_kwargs)
    # NOTE: timm's posterize crashes at 0 kept bits on Pillow 13 (1 image in ~650 of the deit recipe): the reference
    # gets the same black-image op as ours
    timm_tf = with_black_posterize(create_transform(img_size, is_training=True, interpolation="bicubic", **timm_kwargs))

    def ours(path: Path, seed: int = 0) -> torch.Tensor:
        image = decode_rgb_image(str(path))
        ours_tf.set_random_seed(seed)
        return ours_tf(image=image)["image"]

    def reference(path: Path, seed: int = 0) -> torch.Tensor:  # NOTE: timm draws from the global generators
        with Image.open(path) as image:
            return timm_tf(image.convert("RGB"))

    return {"timm": reference, "ours": ours}


def compare_pipelines(recipe: str, files: list[Path], passes: int) -> dict[str, object]:
    """Images/s of each pipeline (median over ``passes``; the pipelines alternate per image) and their ratio."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    fns = _pipelines(recipe)
    clock, _ = timer("cpu")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    outs = {name: fn(files[0]) for name, fn in fns.items()}  # warmup, and the same-seed check
    if outs["ours"].shape != outs["timm"].shape:
        raise RuntimeError(f"{recipe}: output shapes differ: {outs['ours'].shape} vs {outs['timm'].shape}")
    max_abs_diff = (outs["ours"] - outs["timm"]).abs().max().item()
    speeds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(passes):
        spent = dict.fromkeys(fns, 0.0)
        for index, path in enumerate(files):
            for name, fn in fns.items():
                t0 = clock()
                fn(path, index)
                spent[name] += clock() - t0
        for name in fns:
            speeds[name].append(len(files) / spent[name])
    img_size = RECIPES[recipe][0]
    with Image.open(files[0]) as image:
        src = f"{image.width}x{image.height}"
    row: dict[str, object] = dict(recipe=recipe, source=src, crop=img_size, images=len(files), passes=passes)
    row["timm_img_s"] = statistics.median(speeds["timm"])
    row["ours_img_s"] = statistics.median(speeds["ours"])
    row["ratio"] = row["ours_img_s"] / row["timm_img_s"]
    row["max_abs_diff"] = max_abs_diff
    return row
