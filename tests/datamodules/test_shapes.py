"""Tests for the synthetic shapes demo data generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import shapes
from datamodules.shapes import SHAPE_CLASSES, ensure_demo_data, render_scene, write_classification_dataset

SMALL = dict(num_train_per_class=3, num_val_per_class=2, image_size=32)


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _grow(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """4-neighbour dilation."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _descriptor(mask: np.ndarray) -> np.ndarray:
    """Rotation- and scale-invariant: fill of the centroid circle, polar inertia, elongation, hole at centroid."""
    ys, xs = np.nonzero(mask)
    ys, xs = ys + 0.5, xs + 0.5
    cy, cx = ys.mean(), xs.mean()
    r2 = (xs - cx) ** 2 + (ys - cy) ** 2
    eigen = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
    return np.array(
        [
            len(xs) / (np.pi * r2.max()),
            2 * np.pi * r2.sum() / len(xs) ** 2,
            eigen[0] / eigen[1],
            float(not mask[int(cy), int(cx)]),
        ]
    )


def _nearest_centroid_accuracy(train: np.ndarray, test: np.ndarray) -> float:
    """train, test: (classes, samples, features); features standardised by the pooled within-class std."""
    centroids = train.mean(axis=1)
    scale = (train - centroids[:, None]).reshape(-1, train.shape[-1]).std(axis=0) + 1e-6
    queries = test.reshape(-1, test.shape[-1])
    distances = (((queries[:, None] - centroids[None]) / scale) ** 2).sum(-1)
    truth = np.repeat(np.arange(test.shape[0]), test.shape[1])
    return float((distances.argmin(axis=1) == truth).mean())


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_render_scene_is_deterministic_per_seed() -> None:
    labels = [0, 3, 5, 7]
    a = render_scene(np.random.default_rng(7), (40, 56), labels)
    b = render_scene(np.random.default_rng(7), (40, 56), labels)
    c = render_scene(np.random.default_rng(8), (40, 56), labels)
    assert np.array_equal(a.image, b.image)
    assert [(i.label, i.box) for i in a.instances] == [(i.label, i.box) for i in b.instances]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.instances, b.instances))
    assert not np.array_equal(a.image, c.image)


def test_instances_have_exact_boxes_and_disjoint_masks() -> None:
    height, width = 48, 80
    rng = np.random.default_rng(0)
    saw_overlapping_boxes = saw_dropped = False
    for _ in range(20):
        labels = rng.integers(0, len(SHAPE_CLASSES), size=6).tolist()
        scene = render_scene(rng, (height, width), labels, min_scale=0.2, max_scale=0.7)
        assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
        remaining = iter(labels)
        assert all(inst.label in remaining for inst in scene.instances), "instances not a subsequence of labels"
        saw_dropped |= len(scene.instances) < len(labels)
        union = np.zeros((height, width), dtype=int)
        for inst in scene.instances:
            assert inst.mask.shape == (height, width) and inst.mask.dtype == bool
            assert inst.mask.sum() >= 12
            assert inst.box == _bbox(inst.mask)
            union += inst.mask
        assert union.max() <= 1, "a pixel belongs to two instances"
        boxes = [inst.box for inst in scene.instances]
        saw_overlapping_boxes |= any(
            a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            for k, a in enumerate(boxes)
            for b in boxes[k + 1 :]
        )
    assert saw_overlapping_boxes, "occlusion was never exercised"
    assert saw_dropped, "dropping hidden objects was never exercised"


def test_later_objects_occlude_earlier_ones() -> None:
    # Same generator state, one more object on top: earlier visible masks can only shrink, by exactly the pixels the
    # new object covers, and the new object's own mask is untouched.
    first = render_scene(np.random.default_rng(3), 64, [1, 6], 0.4, 0.6, min_visible_pixels=0, min_visible_fraction=0)
    second = render_scene(
        np.random.default_rng(3), 64, [1, 6, 0], 0.4, 0.6, min_visible_pixels=0, min_visible_fraction=0
    )
    top = second.instances[-1].mask
    assert len(first.instances) == 2 and len(second.instances) == 3
    for before, after in zip(first.instances, second.instances):
        assert np.array_equal(after.mask, before.mask & ~top)
    assert (first.instances[0].mask & top).any() or (first.instances[1].mask & top).any()


def test_no_overlap_mode_keeps_objects_apart() -> None:
    rng = np.random.default_rng(1)
    for _ in range(10):
        scene = render_scene(rng, 96, [0, 1, 2, 3, 4], min_scale=0.1, max_scale=0.2, allow_overlap=False)
        assert [i.label for i in scene.instances] == [0, 1, 2, 3, 4]  # room for all, none occluded or dropped
        for k, a in enumerate(scene.instances):
            for b in scene.instances[k + 1 :]:
                assert not (_grow(a.mask) & b.mask).any(), "objects touch"


def test_small_objects_are_dropped() -> None:
    rng = np.random.default_rng(2)
    scene = render_scene(rng, 64, [0, 1, 2], min_scale=0.3, max_scale=0.3, min_visible_pixels=10**6)
    assert scene.instances == []
    scene = render_scene(np.random.default_rng(2), 64, [0, 1, 2], min_scale=0.3, max_scale=0.3)
    assert len(scene.instances) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(labels=[len(SHAPE_CLASSES)]), "labels"),
        (dict(labels=[0], min_scale=0.6, max_scale=0.5), "min_scale"),
        (dict(labels=[0, 1], min_scale=[0.2]), "min_scale"),
        (dict(labels=[0], max_scale=1.5), "max_scale"),
        (dict(labels=[0], size=4), "size"),
    ],
)
def test_render_scene_rejects_bad_input(kwargs: dict, match: str) -> None:
    kwargs = {"size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        render_scene(np.random.default_rng(0), **kwargs)


def test_shape_classes_are_geometrically_distinguishable() -> None:
    rng = np.random.default_rng(4)
    features = np.array(
        [[_descriptor(render_scene(rng, 96, [k], 0.6, 0.9).instances[0].mask) for _ in range(24)] for k in range(8)]
    )
    assert _nearest_centroid_accuracy(features[:, :12], features[:, 12:]) >= 0.95


def test_colour_is_visible_but_not_predictive_of_class() -> None:
    rng = np.random.default_rng(5)
    colours = np.zeros((len(SHAPE_CLASSES), 40, 3))
    contrasts = []
    for k in range(len(SHAPE_CLASSES)):
        for n in range(40):
            scene = render_scene(rng, 48, [k], 0.4, 0.7)
            mask = scene.instances[0].mask
            inner = mask & ~_grow(~mask, 1)  # drop anti-aliased edge pixels
            surround = _grow(mask, 4) & ~_grow(mask, 1)
            colours[k, n] = scene.image[inner].mean(axis=0)
            contrasts.append(np.linalg.norm(colours[k, n] - scene.image[surround].mean(axis=0)))
    assert np.quantile(contrasts, 0.05) > 50.0
    chance = 1 / len(SHAPE_CLASSES)
    assert _nearest_centroid_accuracy(colours[:, :20], colours[:, 20:]) < chance + 0.15


def test_classification_layout(tmp_path: Path) -> None:
    root = write_classification_dataset(tmp_path / "imagenet", seed=3, **SMALL)
    assert root == tmp_path / "imagenet"
    assert (root / "class_names.txt").read_text().splitlines() == sorted(SHAPE_CLASSES)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["version"] == shapes.GENERATOR_VERSION
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SHAPE_CLASSES)
        for name in SHAPE_CLASSES:
            files = sorted((root / split / name).iterdir())
            assert [f.name for f in files] == [f"{name}_{i:05d}.JPEG" for i in range(count)]
            for f in files:
                with Image.open(f) as image:
                    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    train0 = (root / "train" / "circle" / "circle_00000.JPEG").read_bytes()
    assert train0 != (root / "val" / "circle" / "circle_00000.JPEG").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["imagenet"]


def test_classification_dataset_is_deterministic(tmp_path: Path) -> None:
    a = write_classification_dataset(tmp_path / "a", seed=1, **SMALL)
    b = write_classification_dataset(tmp_path / "b", seed=1, **SMALL)
    c = write_classification_dataset(tmp_path / "c", seed=2, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 8 * 5
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sum((a / f).read_bytes() != (c / f).read_bytes() for f in files) == len(files)


def test_marker_makes_second_call_a_no_op_and_its_absence_regenerates(tmp_path: Path) -> None:
    root = write_classification_dataset(tmp_path / "imagenet", **SMALL)
    before = _snapshot(root)
    write_classification_dataset(tmp_path / "imagenet", **SMALL)
    assert _snapshot(root) == before

    (root / "manifest.json").unlink()
    write_classification_dataset(tmp_path / "imagenet", **SMALL)
    after = _snapshot(root)
    assert after.keys() == before.keys()
    jpegs = [k for k in before if k.endswith(".JPEG")]
    assert all(after[k][0] != before[k][0] for k in jpegs), "files were not rewritten"

    write_classification_dataset(tmp_path / "imagenet", overwrite=True, **SMALL)
    assert all(_snapshot(root)[k][0] != after[k][0] for k in jpegs)


def test_changed_parameters_regenerate(tmp_path: Path) -> None:
    root = write_classification_dataset(tmp_path / "imagenet", **SMALL)
    write_classification_dataset(root, **{**SMALL, "image_size": 24})
    assert json.loads((root / "manifest.json").read_text())["image_size"] == 24
    with Image.open(root / "val" / "star" / "star_00001.JPEG") as image:
        assert image.size == (24, 24)


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shapes._classification_image
    calls = {"n": 0}

    def failing(*args: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shapes, "_classification_image", failing)
    with pytest.raises(KeyboardInterrupt):
        write_classification_dataset(tmp_path / "imagenet", **SMALL)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    killed = tmp_path / ".imagenet.tmp-999-deadbeef"  # what a SIGKILLed run leaves behind
    (killed / "train").mkdir(parents=True)
    monkeypatch.setattr(shapes, "_classification_image", real)
    root = write_classification_dataset(tmp_path / "imagenet", **SMALL)
    assert len(list(root.rglob("*.JPEG"))) == 8 * 5
    assert not killed.exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="root"):
        write_classification_dataset(tmp_path / "imagenet", **SMALL)
    assert (tmp_path / "imagenet" / "notes.txt").read_text() == "mine"


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        write_classification_dataset(tmp_path / "x", image_size=8)
    with pytest.raises(ValueError, match="num_train_per_class"):
        write_classification_dataset(tmp_path / "x", num_train_per_class=0)
    assert not (tmp_path / "x").exists()


def test_ensure_demo_data_and_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ensure_demo_data(tmp_path / "demo")
    assert path == tmp_path / "demo" / "imagenet"
    for name in SHAPE_CLASSES:
        assert len(list((path / "train" / name).glob("*.JPEG"))) == shapes.DEMO_TRAIN_PER_CLASS
        assert len(list((path / "val" / name).glob("*.JPEG"))) == shapes.DEMO_VAL_PER_CLASS
    with Image.open(path / "train" / "hexagon" / f"hexagon_{shapes.DEMO_TRAIN_PER_CLASS - 1:05d}.JPEG") as image:
        assert image.size == (64, 64)
    before = _snapshot(path)
    assert shapes.main(["--root", str(tmp_path / "demo")]) == path
    assert capsys.readouterr().out.strip() == str(path)
    assert _snapshot(path) == before
