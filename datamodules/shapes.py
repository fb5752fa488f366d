"""Deterministic synthetic "shapes" demo data: textured scenes with labelled objects, masks and boxes.

A scene is a textured background (a smooth two-colour gradient, low-frequency colour noise and, at low contrast,
stripes or a checkerboard) with objects of the classes in `SHAPE_CLASSES` painted on top in order, each with a
random colour, size, position and rotation. Colour is drawn independently of the class (only kept far enough from
the background under the object to be visible), so the shape is the only cue for the label. Every object that
stays visible yields its class index, its exact visible mask and the tight box of that mask.

`render_scene` is the general renderer (several objects, occlusion, masks, boxes). `write_classification_dataset`
uses it to write the ImageNet class-folder layout; `ensure_demo_data` creates the demo copy on first use:

    python -m datamodules.shapes --root data/demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DEMO_TRAIN_PER_CLASS",
    "DEMO_VAL_PER_CLASS",
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "Scene",
    "ShapeInstance",
    "ensure_demo_data",
    "render_scene",
    "write_classification_dataset",
]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
GENERATOR_VERSION = 2

# Classification images: one dominant object (scale = circumradius / half the image side) placed first, then up to
# MAX_DISTRACTORS objects of other classes at a third of its size or less, never touching it (see
# write_classification_dataset).
MAIN_SCALE = (0.5, 0.9)
DISTRACTOR_SCALE = (0.13, 0.2)
MAX_DISTRACTORS = 2
# Demo dataset size: the pico backbone needs ~4k distinct training images to pass 0.95 top-1 in ~10 epochs.
DEMO_TRAIN_PER_CLASS = 500
DEMO_VAL_PER_CLASS = 60

_MIN_CONTRAST = 100.0  # Euclidean RGB distance between an object's colour and the mean background under it
_SUPERSAMPLE = 3  # sub-pixel samples per axis for anti-aliased edges; mask = coverage >= 0.5
_PLACEMENT_TRIES = 50
_JPEG_QUALITY = 90
_LAYOUT_ENTRIES = frozenset({"train", "val", "class_names.txt", "manifest.json"})


@dataclass
class ShapeInstance:
    """One visible object of a scene.

    Attributes:
        label: Class index into `SHAPE_CLASSES`.
        mask: (H, W) bool, the pixels the object covers that no later object paints over.
        box: (x0, y0, x1, y1) tight box of `mask` in pixel edges: x0 = min column, x1 = max column + 1.
    """

    label: int
    mask: np.ndarray
    box: tuple[float, float, float, float]


@dataclass
class Scene:
    """A rendered scene.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        instances: Visible objects in painting order (later ones are in front).
    """

    image: np.ndarray
    instances: list[ShapeInstance]


def _regular_polygon(n: int, phase: float = 0.0, radius: float = 1.0) -> np.ndarray:
    angles = phase + 2.0 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(points, np.pi / 2)
    inner_vertices = _regular_polygon(points, np.pi / 2 + np.pi / points, inner)
    return np.stack([outer, inner_vertices], axis=1).reshape(-1, 2)


# Polygons in shape coordinates: every shape fits the unit circle (its circumradius is 1).
_POLYGONS = {
    "square": _regular_polygon(4, np.pi / 4),
    "triangle": _regular_polygon(3, np.pi / 2),
    "star": _star(),
    "diamond": np.array([[1.0, 0.0], [0.0, 0.55], [-1.0, 0.0], [0.0, -0.55]]),
    "hexagon": _regular_polygon(6),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = vertices[-1].tolist()
    for x1, y1 in vertices.tolist():
        if y1 != y0:  # NOTE: even-odd crossing rule; horizontal edges never cross a horizontal ray
            crosses = (y0 > v) != (y1 > v)
            inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
        x0, y0 = x1, y1
    return inside


def _inside_shape(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    return _inside_polygon(u, v, _POLYGONS[name])


def _coverage(
    label: int, height: int, width: int, cx: float, cy: float, radius: float, angle: float
) -> tuple[np.ndarray, slice, slice]:
    """Fraction of each pixel covered by the shape, over the shape's clipped bounding square."""
    y0, y1 = max(0, int(np.floor(cy - radius))), min(height, int(np.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(np.floor(cx - radius))), min(width, int(np.ceil(cx + radius)) + 1)
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = ((np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) - cy).astype(np.float32)
    xs = ((np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) - cx).astype(np.float32)
    dx, dy = xs[None, :], ys[:, None]
    cos, sin = math.cos(angle) / radius, math.sin(angle) / radius  # NOTE: Python floats keep the arrays float32
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    inside = _inside_shape(SHAPE_CLASSES[label], u, v)
    hits = inside.view(np.uint8)
    coverage = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    for i in range(_SUPERSAMPLE):  # NOTE: strided slices sum much faster than a reduction over interleaved axes
        for j in range(_SUPERSAMPLE):
            coverage += hits[i::_SUPERSAMPLE, j::_SUPERSAMPLE]
    return coverage / _SUPERSAMPLE**2, slice(y0, y1), slice(x0, x1)


def _smooth_resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights interpolating n_in corner-aligned samples with a smoothstep (C1) kernel."""
    position = np.linspace(0.0, n_in - 1, n_out)
    left = np.minimum(position.astype(int), n_in - 2)
    frac = position - left
    frac = frac * frac * (3.0 - 2.0 * frac)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    weights[np.arange(n_out), left] = 1.0 - frac
    weights[np.arange(n_out), left + 1] = frac
    return weights


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient + low-frequency colour noise + (maybe) low-contrast stripes or checkerboard, float32 (H, W, 3)."""
    yy = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(width, dtype=np.float32)[None, :] + 0.5
    theta = float(rng.uniform(0.0, 2.0 * np.pi))
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    start, end = rng.uniform(25.0, 230.0, size=(2, 3)).astype(np.float32)
    image = start + (end - start) * t[..., None]

    cells = int(rng.integers(2, 6))
    noise = rng.normal(0.0, rng.uniform(6.0, 18.0), size=(cells, cells, 3)).astype(np.float32)
    noise = np.tensordot(_smooth_resize_matrix(height, cells), noise, axes=(1, 0))  # (H, cells, 3)
    image += np.tensordot(noise, _smooth_resize_matrix(width, cells), axes=(1, 1)).transpose(0, 2, 1)

    pattern = int(rng.integers(3))  # 0: none, 1: stripes, 2: checkerboard
    if pattern:
        phi = float(rng.uniform(0.0, np.pi))
        frequency = 2.0 * np.pi / max(3.0, float(rng.uniform(0.06, 0.25)) * min(height, width))
        a = (xx * math.cos(phi) + yy * math.sin(phi)) * frequency + float(rng.uniform(0.0, 2.0 * np.pi))
        wave = np.sin(a)
        if pattern == 2:
            wave = np.sign(wave * np.sin((yy * math.cos(phi) - xx * math.sin(phi)) * frequency))
        tint = (rng.uniform(0.5, 1.0, size=3) * rng.uniform(6.0, 16.0)).astype(np.float32)
        image += wave[..., None] * tint
    return np.clip(image, 0.0, 255.0, out=image)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least _MIN_CONTRAST from the mean of `under` (N, 3); the farthest of the tries otherwise."""
    reference = under.mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(32):
        colour = rng.uniform(0.0, 255.0, size=3)
        distance = float(np.linalg.norm(colour - reference))
        if distance >= _MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _center(rng: np.random.Generator, radius: float, extent: int) -> float:
    """A centre coordinate keeping the shape's circumcircle inside [0, extent] when it fits."""
    lo, hi = min(radius, extent / 2), max(extent - radius, extent / 2)
    return float(rng.uniform(lo, hi))


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _disc_hits(mask: np.ndarray, cx: float, cy: float, radius: float) -> bool:
    """Whether any True pixel of `mask` has its centre within `radius` of (cx, cy)."""
    y0, y1 = max(0, int(cy - radius)), min(mask.shape[0], int(cy + radius) + 1)
    x0, x1 = max(0, int(cx - radius)), min(mask.shape[1], int(cx + radius) + 1)
    dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]
    dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
    return bool((mask[y0:y1, x0:x1] & (dx * dx + dy * dy <= radius * radius)).any())


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if min(height, width) < 8:
        raise ValueError(f"size must be at least 8 pixels per side, got {size!r}; pass e.g. size=64 or (64, 96)")
    return int(height), int(width)


def _per_label(value: float | Sequence[float], n: int, name: str) -> list[float]:
    values = [float(value)] * n if np.isscalar(value) else [float(x) for x in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} labels; pass one float or one per label")
    if not all(0.0 < x <= 1.0 for x in values):
        raise ValueError(f"{name} must lie in (0, 1] (circumradius / half the shorter side), got {value!r}")
    return values


def render_scene(
    rng: np.random.Generator,
    size: int | tuple[int, int],
    labels: Sequence[int],
    min_scale: float | Sequence[float] = 0.15,
    max_scale: float | Sequence[float] = 0.5,
    allow_overlap: bool = True,
    *,
    min_visible_pixels: int = 12,
    min_visible_fraction: float = 0.25,
) -> Scene:
    """Render objects of the given classes, in order, on a textured background.

    Each object's scale (circumradius over half the shorter image side) is drawn uniformly from
    [min_scale, max_scale]; its centre keeps the circumcircle inside the image; its rotation is uniform. Edges are
    anti-aliased; an object owns a pixel when it covers at least half of it and no later object does.

    Args:
        rng: Source of all randomness; the same generator state gives the same scene.
        size: Image side, or (height, width).
        labels: Class indices into `SHAPE_CLASSES`, in painting order (later objects occlude earlier ones).
        min_scale: Lower scale bound, one float or one per label.
        max_scale: Upper scale bound, one float or one per label.
        allow_overlap: If False, each object is placed so that its circumscribed circle neither overlaps nor touches
            earlier objects; an object that finds no such place in `_PLACEMENT_TRIES` tries is skipped.
        min_visible_pixels: Objects with fewer visible pixels are dropped.
        min_visible_fraction: Objects with less than this fraction of their own area visible are dropped.

    Returns:
        The scene; `instances` holds only objects that stayed visible, in painting order.
    """
    height, width = _parse_size(size)
    labels = [int(label) for label in labels]
    if any(not 0 <= label < len(SHAPE_CLASSES) for label in labels):
        raise ValueError(f"labels must be class indices in [0, {len(SHAPE_CLASSES)}), got {labels}")
    lows = _per_label(min_scale, len(labels), "min_scale")
    highs = _per_label(max_scale, len(labels), "max_scale")
    if any(lo > hi for lo, hi in zip(lows, highs)):
        raise ValueError(f"min_scale {min_scale!r} exceeds max_scale {max_scale!r}; pass min_scale <= max_scale")

    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int32)
    occupied = np.zeros((height, width), dtype=bool)
    painted: list[tuple[int, int]] = []  # (label, full area) per painted object; its index is its owner id
    half_side = min(height, width) / 2
    for label, lo, hi in zip(labels, lows, highs):
        radius = float(rng.uniform(lo, hi)) * half_side
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        for _ in range(1 if allow_overlap else _PLACEMENT_TRIES):
            cx, cy = _center(rng, radius, width), _center(rng, radius, height)
            if allow_overlap or not _disc_hits(occupied, cx, cy, radius + 1.0):
                break
        else:
            continue
        coverage, ys, xs = _coverage(label, height, width, cx, cy, radius, angle)
        mask = coverage >= 0.5
        if not mask.any():
            continue
        region = canvas[ys, xs]
        colour = _pick_colour(rng, region[mask])
        # NOTE: a gentle linear shading across the object, so it is not a flat fill
        direction, strength = float(rng.uniform(0.0, 2.0 * np.pi)), float(rng.uniform(-0.15, 0.15)) / radius
        gx = (np.arange(xs.start, xs.stop, dtype=np.float32) + (0.5 - cx))[None, :] * math.cos(direction)
        gy = (np.arange(ys.start, ys.stop, dtype=np.float32) + (0.5 - cy))[:, None] * math.sin(direction)
        shade = 1.0 + strength * (gx + gy)
        fill = np.clip(colour.astype(np.float32) * shade[..., None], 0.0, 255.0)
        alpha = coverage[..., None]
        canvas[ys, xs] = region * (1.0 - alpha) + fill * alpha
        owner[ys, xs][mask] = len(painted)
        painted.append((label, int(mask.sum())))
        if not allow_overlap:
            footprint = np.zeros_like(occupied)
            footprint[ys, xs] = mask
            occupied |= _dilate(footprint)

    instances = []
    for index, (label, full_area) in enumerate(painted):
        visible = owner == index
        area = int(visible.sum())
        if area == 0 or area < min_visible_pixels or area < min_visible_fraction * full_area:
            continue
        instances.append(ShapeInstance(label=label, mask=visible, box=_mask_box(visible)))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, instances=instances)


def _classification_image(rng: np.random.Generator, label: int, image_size: int) -> np.ndarray:
    num_distractors = int(rng.integers(0, MAX_DISTRACTORS + 1))
    others = [c for c in range(len(SHAPE_CLASSES)) if c != label]
    distractors = [int(c) for c in rng.choice(others, size=num_distractors, replace=False)]
    scene = render_scene(
        rng,
        image_size,
        [label, *distractors],
        min_scale=[MAIN_SCALE[0]] + [DISTRACTOR_SCALE[0]] * num_distractors,
        max_scale=[MAIN_SCALE[1]] + [DISTRACTOR_SCALE[1]] * num_distractors,
        allow_overlap=False,
    )
    return scene.image


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise generators of one root across processes (e.g. DDP ranks); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_replaceable(root: Path, entries: frozenset[str], generator: str) -> None:
    """Refuse to replace `root` when it holds anything but `entries` (what `generator` writes)."""
    if not root.exists():
        return
    foreign = sorted(p.name for p in root.iterdir() if p.name not in entries) if root.is_dir() else [""]
    if foreign:
        raise ValueError(
            f"root {str(root)!r} holds files the {generator} did not write ({foreign[:3]}); "
            "pass a new or empty directory"
        )


def build_dataset_atomically(
    root: Path,
    manifest: dict,
    entries: frozenset[str],
    generator: str,
    fill: Callable[[Path], None],
    overwrite: bool = False,
) -> Path:
    """Build a generated dataset with `fill(staging)` in a hidden sibling of `root`, then rename it into place.

    `manifest.json` is written last, so an interrupted run never leaves a `root` that looks complete; a `root` whose
    manifest equals `manifest` is returned untouched (unless `overwrite`); a `root` holding anything but `entries` is
    refused; one process builds at a time (a lock file beside `root`) and leftovers of killed runs are removed.
    """
    if not overwrite and _read_manifest(root) == manifest:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(root.with_name(f".{root.name}.lock")):
        if not overwrite and _read_manifest(root) == manifest:  # another process finished it meanwhile
            return root
        _check_replaceable(root, entries, generator)
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by killed runs; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            fill(staging)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if root.exists():
                retired = root.with_name(f".{root.name}.tmp-old-{uuid.uuid4().hex[:8]}")
                os.replace(root, retired)
                os.replace(staging, root)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return root


def write_classification_dataset(
    root: str | Path,
    *,
    num_train_per_class: int = DEMO_TRAIN_PER_CLASS,
    num_val_per_class: int = DEMO_VAL_PER_CLASS,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the shapes classification dataset in the ImageNet class-folder layout.

    Layout: `root/{train,val}/<class_name>/<class_name>_<idx:05d>.JPEG` (RGB, JPEG quality 90),
    `root/class_names.txt` (one name per line, in the readers' class-index order: sorted folder names) and
    `root/manifest.json` (generator version, seed and sizes). Each image holds one dominant object of its folder's
    class (scale 0.5-0.9) placed first, and 0-2 distractors of other classes at scale 0.13-0.2 (at most ~40% of the
    main object's size) that neither overlap nor touch it, so the label is unambiguous while the model still has to
    ignore small clutter.
    Image (split, class, idx) is drawn from its own generator seeded with (seed, split, class, idx): train and val
    differ and any image can be regenerated alone.

    The dataset is built in a hidden sibling directory, `manifest.json` written last, and then renamed into place,
    so an interrupted run never leaves a `root` that looks complete. A `root` whose manifest matches the requested
    parameters is returned untouched; otherwise it is regenerated (only if it holds nothing but this layout).

    Args:
        root: Output directory.
        num_train_per_class: Training images per class.
        num_val_per_class: Validation images per class.
        image_size: Side of the square images, at least 16.
        seed: Non-negative base seed.
        overwrite: Regenerate even when a matching manifest exists.

    Returns:
        `root` as a Path.
    """
    if num_train_per_class < 1 or num_val_per_class < 1:
        raise ValueError(
            f"num_train_per_class and num_val_per_class must be >= 1, got {num_train_per_class}, {num_val_per_class}"
        )
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    root = Path(root)
    manifest = {
        "generator": "datamodules.shapes",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_train_per_class": num_train_per_class,
        "num_val_per_class": num_val_per_class,
        "class_names": list(SHAPE_CLASSES),
    }

    def fill(staging: Path) -> None:
        for split_id, (split, count) in enumerate((("train", num_train_per_class), ("val", num_val_per_class))):
            for label, name in enumerate(SHAPE_CLASSES):
                folder = staging / split / name
                folder.mkdir(parents=True)
                for idx in range(count):
                    rng = np.random.default_rng([seed, split_id, label, idx])
                    image = _classification_image(rng, label, image_size)
                    Image.fromarray(image).save(folder / f"{name}_{idx:05d}.JPEG", quality=_JPEG_QUALITY)
        (staging / "class_names.txt").write_text("".join(f"{name}\n" for name in sorted(SHAPE_CLASSES)))

    return build_dataset_atomically(root, manifest, _LAYOUT_ENTRIES, "shapes generator", fill, overwrite)


def ensure_demo_data(root: str | Path = "data/demo") -> Path:
    """Create the demo classification dataset under `root/imagenet` on first use and return that path.

    Args:
        root: Demo data root (relative paths resolve against the working directory).

    Returns:
        Path of the ImageNet-layout dataset (`root/imagenet`).
    """
    return write_classification_dataset(Path(root) / "imagenet")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes demo data.")
    parser.add_argument("--root", default="data/demo", help="demo data root (default: data/demo)")
    path = ensure_demo_data(parser.parse_args(argv).root)
    print(path)
    return path


if __name__ == "__main__":
    main()
