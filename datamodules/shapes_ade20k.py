"""Deterministic synthetic shapes in the ADE20K (ADEChallengeData2016) semantic-segmentation layout.

Scenes come from `datamodules.shapes.render_scene`: 2-5 objects of random classes (scale 0.15-0.45) on a textured
background, placed independently so that they may overlap; later objects occlude earlier ones. The label map gives
each pixel the class value (`SHAPE_CLASSES` index + 1) of the object that owns it, 0 ("other", ignored in training)
elsewhere. Ownership is render_scene's: an object owns a pixel when it covers at least half of it and no later object
does, and the map is built from the scene's instance masks, so it always matches what is visible. Every object that
still owns a pixel is kept (no minimum visible area), so no painted object is labelled as background.

    python -m datamodules.shapes_ade20k --root data/demo
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .shapes import _JPEG_QUALITY, GENERATOR_VERSION, SHAPE_CLASSES, Scene, build_dataset_atomically, render_scene

__all__ = [
    "ADE_GENERATOR_VERSION",
    "DEMO_NUM_TRAIN",
    "DEMO_NUM_VAL",
    "ensure_demo_ade20k",
    "render_ade20k_scene",
    "semantic_label_map",
    "write_ade20k_dataset",
]

ADE_GENERATOR_VERSION = 1
DEMO_NUM_TRAIN = 2000
DEMO_NUM_VAL = 100

OBJECT_SCALE = (0.15, 0.45)  # circumradius / half the image side
NUM_OBJECTS = (2, 5)  # inclusive

_MIN_IMAGE_SIZE = 32
_SPLITS = (("training", "train"), ("validation", "val"))  # folder name, file-name tag
_LAYOUT_ENTRIES = frozenset({"images", "annotations", "class_names.txt", "manifest.json"})


def render_ade20k_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """Render one segmentation scene: 2-5 objects of random classes at scale 0.15-0.45, overlap allowed.

    Args:
        rng: Source of all randomness; the same generator state gives the same scene.
        image_size: Side of the square image, at least 32.

    Returns:
        The scene; `instances` holds every painted object that still owns at least one pixel, in painting order.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}; pass e.g. 128")
    count = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
    labels = rng.integers(len(SHAPE_CLASSES), size=count).tolist()
    return render_scene(
        rng, image_size, labels, *OBJECT_SCALE, allow_overlap=True, min_visible_pixels=1, min_visible_fraction=0.0
    )


def semantic_label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8 label map of `scene`: `label + 1` on each instance's mask, 0 ("other") elsewhere."""
    labels = np.zeros(scene.image.shape[:2], dtype=np.uint8)
    for instance in scene.instances:  # NOTE: instance masks are disjoint (one owner per pixel)
        labels[instance.mask] = instance.label + 1
    return labels


def _image_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    # NOTE: the leading tag keeps these streams apart from the classification and COCO generators'
    return np.random.default_rng([0xADE2, seed, split_id, index])


def _file_stem(tag: str, index: int) -> str:
    """ADE20K's file stem of the `index`-th (0-based) image of a split: numbering starts at 1."""
    return f"ADE_{tag}_{index + 1:08d}"


def _write_split(staging: Path, folder: str, tag: str, seed: int, split_id: int, count: int, image_size: int) -> None:
    images, annotations = staging / "images" / folder, staging / "annotations" / folder
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for index in range(count):
        scene = render_ade20k_scene(_image_rng(seed, split_id, index), image_size)
        stem = _file_stem(tag, index)
        Image.fromarray(scene.image).save(images / f"{stem}.jpg", quality=_JPEG_QUALITY)
        Image.fromarray(semantic_label_map(scene)).save(annotations / f"{stem}.png")


def write_ade20k_dataset(
    root: str | Path,
    *,
    num_train: int = DEMO_NUM_TRAIN,
    num_val: int = DEMO_NUM_VAL,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the shapes semantic-segmentation dataset in the ADE20K (ADEChallengeData2016) layout.

    Layout: `root/images/{training,validation}/ADE_{train,val}_<n:08d>.jpg` (RGB, JPEG quality 90, n from 1),
    `root/annotations/{training,validation}/<same stem>.png` (single-channel uint8, mode "L": 0 = other / unlabelled,
    c + 1 = class `SHAPE_CLASSES[c]`), `root/class_names.txt` (the 8 class names, line i = value i + 1) and
    `root/manifest.json` (generator versions and all parameters). Scenes as in `render_ade20k_scene`.
    Image (split, idx) is drawn from its own generator seeded with (seed, split, idx).

    The dataset is built in a hidden sibling directory, `manifest.json` written last, and then renamed into place,
    so an interrupted run never leaves a `root` that looks complete. A `root` whose manifest matches the requested
    parameters is returned untouched; otherwise it is regenerated (only if it holds nothing but this layout).

    Args:
        root: Output directory.
        num_train: Training images.
        num_val: Validation images.
        image_size: Side of the square images, at least 32.
        seed: Non-negative base seed.
        overwrite: Regenerate even when a matching manifest exists.

    Returns:
        `root` as a Path.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}; pass positive counts")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}; pass e.g. 128")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    root = Path(root)
    manifest = {
        "generator": "datamodules.shapes_ade20k",
        "version": ADE_GENERATOR_VERSION,
        "renderer_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "class_names": list(SHAPE_CLASSES),
    }

    def fill(staging: Path) -> None:
        for split_id, ((folder, tag), count) in enumerate(zip(_SPLITS, (num_train, num_val))):
            _write_split(staging, folder, tag, seed, split_id, count, image_size)
        (staging / "class_names.txt").write_text("".join(f"{name}\n" for name in SHAPE_CLASSES))

    return build_dataset_atomically(root, manifest, _LAYOUT_ENTRIES, "shapes ADE20K generator", fill, overwrite)


def ensure_demo_ade20k(root: str | Path = "data/demo") -> Path:
    """Create the demo ADE20K dataset under `root/ade20k` on first use and return that path.

    Args:
        root: Demo data root (relative paths resolve against the working directory).

    Returns:
        Path of the ADE20K-layout dataset (`root/ade20k`).
    """
    return write_ade20k_dataset(Path(root) / "ade20k")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes demo data in the ADE20K layout.")
    parser.add_argument("--root", default="data/demo", help="demo data root (default: data/demo)")
    path = ensure_demo_ade20k(parser.parse_args(argv).root)
    print(path)
    return path


if __name__ == "__main__":
    main()
