"""Deterministic synthetic shapes in the COCO 2017 detection / instance-segmentation layout.

Scenes come from `datamodules.shapes.render_scene`: 1-4 objects of random classes (scale 0.2-0.45, never touching,
so every box is unambiguous) on a textured background. A few images hold no object at all, and a few others also get
a crowd region: a cluster of 3-6 tiny objects of one class in one corner, away from the other objects, annotated as a
single `iscrowd=1` region (union mask as uncompressed RLE, as COCO writes crowds). Category ids have gaps, like COCO's.

Each object's polygon is traced with `cv2.findContours` on its mask upsampled 4x, so that vertices lie on pixel
edges: pycocotools then rasterises it back to exactly the rendered mask. Masks with holes (rings) cannot be written
as COCO polygons (they are unioned) and are written as compressed RLE instead.

    python -m datamodules.shapes_coco --root data/demo
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .shapes import (
    _JPEG_QUALITY,
    GENERATOR_VERSION,
    SHAPE_CLASSES,
    ShapeInstance,
    _coverage,
    _dilate,
    _disc_hits,
    _mask_box,
    _pick_colour,
    build_dataset_atomically,
    render_scene,
)

__all__ = [
    "CATEGORY_IDS",
    "COCO_GENERATOR_VERSION",
    "DEMO_NUM_TRAIN",
    "DEMO_NUM_VAL",
    "CocoScene",
    "ensure_demo_coco",
    "render_coco_scene",
    "write_coco_dataset",
]

COCO_GENERATOR_VERSION = 1
CATEGORY_IDS: tuple[int, ...] = (1, 3, 4, 7, 8, 10, 13, 15)  # one per SHAPE_CLASSES entry, in that order
DEMO_NUM_TRAIN = 1200
DEMO_NUM_VAL = 150

OBJECT_SCALE = (0.2, 0.45)  # circumradius / half the image side
MAX_OBJECTS = 4
CROWD_SCALE = (0.06, 0.1)
CROWD_SIZE = (3, 6)  # objects per crowd region, inclusive
EMPTY_FRACTION = 0.05  # of each split, rounded up
CROWD_FRACTION = 0.05

_MIN_IMAGE_SIZE = 32
_CROWD_CORNER = 0.4  # side of the corner square holding a crowd, as a fraction of the image side
_CROWD_PLACEMENT_TRIES = 30
_CROWD_SCENE_TRIES = 10
_POLYGON_UPSAMPLE = 4
_POLYGON_TOLERANCE = 1.0  # approxPolyDP epsilon in upsampled pixels (a quarter pixel); still decodes exactly
_SPLITS = ("train", "val")
_LAYOUT_ENTRIES = frozenset({"annotations", "train2017", "val2017", "manifest.json"})


@dataclass
class CocoScene:
    """A rendered detection scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        instances: Objects in painting order, each with its exact visible mask and tight box; they never touch.
        crowd: The crowd region (its class, the union mask of its objects and that mask's box), or None.
    """

    image: np.ndarray
    instances: list[ShapeInstance]
    crowd: ShapeInstance | None


def _crowd_layout(
    rng: np.random.Generator, label: int, image_size: int, forbidden: np.ndarray, x0: float, y0: float
) -> list[tuple[np.ndarray, slice, slice]]:
    """Coverage patches of the crowd objects placed in the corner square at (x0, y0), clear of `forbidden`."""
    side, half = _CROWD_CORNER * image_size, image_size / 2
    count = int(rng.integers(CROWD_SIZE[0], CROWD_SIZE[1] + 1))
    patches = []
    for _ in range(count):
        radius = float(rng.uniform(*CROWD_SCALE)) * half
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        for _ in range(_CROWD_PLACEMENT_TRIES):
            cx = float(rng.uniform(x0 + radius, x0 + side - radius))
            cy = float(rng.uniform(y0 + radius, y0 + side - radius))
            if not _disc_hits(forbidden, cx, cy, radius + 1.0):
                break
        else:
            continue
        coverage, ys, xs = _coverage(label, image_size, image_size, cx, cy, radius, angle)
        if (coverage >= 0.5).any():
            patches.append((coverage, ys, xs))
    return patches


def _paint_crowd(
    rng: np.random.Generator, image: np.ndarray, instances: Sequence[ShapeInstance]
) -> tuple[np.ndarray, ShapeInstance] | None:
    """Paint a crowd cluster into a corner free of `instances`; None when no corner holds `CROWD_SIZE[0]` objects."""
    image_size = image.shape[0]
    occupied = np.zeros(image.shape[:2], dtype=bool)
    for instance in instances:
        occupied |= instance.mask
    forbidden = _dilate(occupied)
    label = int(rng.integers(len(SHAPE_CLASSES)))
    far = image_size * (1.0 - _CROWD_CORNER)
    for corner in rng.permutation(4).tolist():
        patches = _crowd_layout(rng, label, image_size, forbidden, far * (corner % 2), far * (corner // 2))
        if len(patches) >= CROWD_SIZE[0]:
            break
    else:
        return None
    canvas = image.astype(np.float32)
    union = np.zeros_like(occupied)
    for coverage, ys, xs in patches:
        mask = coverage >= 0.5
        region = canvas[ys, xs]
        colour = _pick_colour(rng, region[mask]).astype(np.float32)
        alpha = coverage[..., None]
        canvas[ys, xs] = region * (1.0 - alpha) + colour * alpha
        union[ys, xs] |= mask
    painted = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return painted, ShapeInstance(label=label, mask=union, box=_mask_box(union))


def render_coco_scene(rng: np.random.Generator, image_size: int, kind: str = "objects") -> CocoScene:
    """Render one detection scene.

    Args:
        rng: Source of all randomness; the same generator state gives the same scene.
        image_size: Side of the square image, at least 32.
        kind: "objects" (1-4 objects of random classes at scale 0.2-0.45 that never touch), "empty" (background
            only) or "crowd" (objects as above plus a crowd region of 3-6 objects of one class at scale 0.06-0.1 in
            one corner, clear of the others; the scene is redrawn up to 10 times until one fits, else no crowd).

    Returns:
        The scene; every painted object is in `instances` (none is occluded or dropped).
    """
    if kind not in ("objects", "empty", "crowd"):
        raise ValueError(f"kind must be 'objects', 'empty' or 'crowd', got {kind!r}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    if kind == "empty":
        return CocoScene(image=render_scene(rng, image_size, []).image, instances=[], crowd=None)
    for _ in range(_CROWD_SCENE_TRIES if kind == "crowd" else 1):
        labels = rng.integers(len(SHAPE_CLASSES), size=int(rng.integers(1, MAX_OBJECTS + 1))).tolist()
        scene = render_scene(rng, image_size, labels, *OBJECT_SCALE, allow_overlap=False, min_visible_pixels=1)
        if kind == "objects":
            break
        painted = _paint_crowd(rng, scene.image, scene.instances)
        if painted is not None:
            return CocoScene(image=painted[0], instances=scene.instances, crowd=painted[1])
    return CocoScene(image=scene.image, instances=scene.instances, crowd=None)


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (flat x, y lists on pixel edges) of `mask`; empty when it has a hole or no valid contour."""
    k = _POLYGON_UPSAMPLE
    big = np.repeat(np.repeat(mask.astype(np.uint8), k, axis=0), k, axis=1)
    # NOTE: the top level of RETR_CCOMP is exactly RETR_EXTERNAL; its second level reveals holes
    contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or (hierarchy[0, :, 3] >= 0).any():
        return []
    polygons = []
    for contour in contours:
        points = cv2.approxPolyDP(contour, _POLYGON_TOLERANCE, True).reshape(-1, 2)
        if len(points) >= 3:
            # NOTE: upsampled boundary pixel centres sit 1/(2k) px inside the pixel edges pycocotools expects
            polygons.append(((points.astype(np.float64) + 0.5) / k).ravel().tolist())
    return polygons


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(x) for x in rle["size"]]}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a (maybe empty) 0-run."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _annotation(ann_id: int, image_id: int, instance: ShapeInstance, iscrowd: bool) -> dict:
    x0, y0, x1, y1 = instance.box
    if iscrowd:
        segmentation: list | dict = _uncompressed_rle(instance.mask)
    else:
        segmentation = _polygons(instance.mask) or _compressed_rle(instance.mask)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATEGORY_IDS[instance.label],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": float(instance.mask.sum()),
        "iscrowd": int(iscrowd),
        "segmentation": segmentation,
    }


def _image_kinds(seed: int, split_id: int, count: int) -> list[str]:
    """Kind of each image of a split: ceil(5%) empty, ceil(5%) with a crowd region, at positions drawn per split."""
    num_empty = min(count, math.ceil(EMPTY_FRACTION * count))
    num_crowd = min(count - num_empty, math.ceil(CROWD_FRACTION * count))
    order = np.random.default_rng([0xC0C0, seed, split_id]).permutation(count)
    kinds = ["objects"] * count
    for position in order[:num_empty].tolist():
        kinds[position] = "empty"
    for position in order[num_empty : num_empty + num_crowd].tolist():
        kinds[position] = "crowd"
    return kinds


def _image_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    # NOTE: the leading tag keeps these streams apart from the classification generator's
    return np.random.default_rng([0xC0C0, seed, split_id, index])


def _categories() -> list[dict]:
    return [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, SHAPE_CLASSES)]


def _write_split(folder: Path, seed: int, split_id: int, count: int, image_size: int, first_id: int) -> dict:
    """Write the images of one split into `folder` and return its annotation file's content."""
    images, annotations = [], []
    for index, kind in enumerate(_image_kinds(seed, split_id, count)):
        scene = render_coco_scene(_image_rng(seed, split_id, index), image_size, kind)
        image_id = first_id + index
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(scene.image).save(folder / file_name, quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for instance in scene.instances:
            annotations.append(_annotation(len(annotations) + 1, image_id, instance, iscrowd=False))
        if scene.crowd is not None:
            annotations.append(_annotation(len(annotations) + 1, image_id, scene.crowd, iscrowd=True))
    info = {
        "description": "Strata synthetic shapes (datamodules.shapes_coco)",
        "version": str(COCO_GENERATOR_VERSION),
        "contributor": "Strata",
        "url": "",
    }
    return {"info": info, "licenses": [], "images": images, "categories": _categories(), "annotations": annotations}


def write_coco_dataset(
    root: str | Path,
    *,
    num_train: int = DEMO_NUM_TRAIN,
    num_val: int = DEMO_NUM_VAL,
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the shapes detection / instance-segmentation dataset in the COCO 2017 layout.

    Layout: `root/annotations/instances_{train,val}2017.json`, `root/{train,val}2017/<id:012d>.jpg` (RGB, JPEG
    quality 90) and `root/manifest.json` (generator versions and all parameters). Image ids run 1..num_train in
    train and on from there in val; annotation ids run from 1 in each file. Category ids are `CATEGORY_IDS` (with
    gaps), names `SHAPE_CLASSES`, supercategory "shape". Per split, ceil(5%) of the images hold no object (they are
    still listed in "images") and ceil(5%) also hold a crowd region (see `render_coco_scene`). Objects carry polygons
    that decode to their exact mask (compressed RLE for masks with holes), `bbox` = [x, y, w, h] and `area` = pixel
    count of the mask; a crowd carries `iscrowd=1` and its union mask as uncompressed RLE.
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
        "generator": "datamodules.shapes_coco",
        "version": COCO_GENERATOR_VERSION,
        "renderer_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "class_names": list(SHAPE_CLASSES),
        "category_ids": list(CATEGORY_IDS),
    }

    def fill(staging: Path) -> None:
        (staging / "annotations").mkdir()
        first_id = 1
        for split_id, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
            folder = staging / f"{split}2017"
            folder.mkdir()
            dataset = _write_split(folder, seed, split_id, count, image_size, first_id)
            annotation_file = staging / "annotations" / f"instances_{split}2017.json"
            annotation_file.write_text(json.dumps(dataset, separators=(",", ":")))
            first_id += count

    return build_dataset_atomically(root, manifest, _LAYOUT_ENTRIES, "shapes COCO generator", fill, overwrite)


def ensure_demo_coco(root: str | Path = "data/demo") -> Path:
    """Create the demo COCO dataset under `root/coco` on first use and return that path.

    Args:
        root: Demo data root (relative paths resolve against the working directory).

    Returns:
        Path of the COCO-layout dataset (`root/coco`).
    """
    return write_coco_dataset(Path(root) / "coco")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes demo data in the COCO layout.")
    parser.add_argument("--root", default="data/demo", help="demo data root (default: data/demo)")
    path = ensure_demo_coco(parser.parse_args(argv).root)
    print(path)
    return path


if __name__ == "__main__":
    main()
