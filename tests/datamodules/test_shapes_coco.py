"""Tests for the synthetic shapes generator's COCO 2017 layout."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from datamodules import shapes_coco
from datamodules.shapes import SHAPE_CLASSES, render_scene
from datamodules.shapes_coco import CATEGORY_IDS, ensure_demo_coco, render_coco_scene, write_coco_dataset

SMALL = dict(num_train=12, num_val=6, image_size=64)
SPLITS = (("train", 12, 1), ("val", 6, 13))  # split, images, first image id


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _decode(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Like COCO.annToMask: polygons and uncompressed RLE go through frPyObjects, compressed RLE decodes as is."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def _grow(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation."""
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _load(root: Path, split: str) -> COCO:
    with open(root / "annotations" / f"instances_{split}2017.json") as f:
        assert json.load(f)  # plain JSON first, then pycocotools builds its index
    return COCO(str(root / "annotations" / f"instances_{split}2017.json"))


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco_dataset(tmp_path_factory.mktemp("data") / "coco", seed=0, **SMALL)


def test_layout_images_and_categories(small_coco: Path) -> None:
    root = small_coco
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "manifest.json", "train2017", "val2017"]
    assert not list(root.parent.glob(".coco.tmp-*"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == shapes_coco.COCO_GENERATOR_VERSION
    assert {k: manifest[k] for k in ("seed", "num_train", "num_val", "image_size")} == {"seed": 0, **SMALL}
    for split, count, first_id in SPLITS:
        coco = _load(root, split)
        ids = list(range(first_id, first_id + count))
        assert sorted(coco.getImgIds()) == ids
        names = [coco.imgs[i]["file_name"] for i in ids]
        assert names == [f"{i:012d}.jpg" for i in ids]
        assert sorted(p.name for p in (root / f"{split}2017").iterdir()) == names
        for name in names:
            with Image.open(root / f"{split}2017" / name) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
        assert coco.dataset["categories"] == [
            {"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, SHAPE_CLASSES)
        ]
        assert tuple(range(1, len(SHAPE_CLASSES) + 1)) != CATEGORY_IDS  # gaps, like COCO's ids
        assert [a["id"] for a in coco.dataset["annotations"]] == list(range(1, len(coco.dataset["annotations"]) + 1))
        empty = [i for i in ids if not coco.getAnnIds(imgIds=i)]
        expected = math.ceil(shapes_coco.EMPTY_FRACTION * len(ids))  # an independent count, not the writer's
        assert len(empty) == expected, f"{split}: {expected} images without objects expected, got {empty}"


def test_annotations_match_the_rendered_scenes(small_coco: Path) -> None:
    num_crowds = num_polygons = 0
    for split_id, (split, count, first_id) in enumerate(SPLITS):
        coco = _load(small_coco, split)
        kinds = shapes_coco._image_kinds(0, split_id, count)
        for index, kind in enumerate(kinds):
            image_id = first_id + index
            scene = render_coco_scene(shapes_coco._image_rng(0, split_id, index), 64, kind)
            with Image.open(small_coco / f"{split}2017" / coco.imgs[image_id]["file_name"]) as image:
                on_disk = np.asarray(image, dtype=np.float32)
            stranger = render_coco_scene(shapes_coco._image_rng(1, split_id, index), 64, kind)
            error = np.abs(on_disk - scene.image).mean()
            assert error < 10.0 and error < 0.5 * np.abs(on_disk - stranger.image).mean()  # this scene, up to JPEG

            anns = coco.imgToAnns[image_id]
            objects = [a for a in anns if not a["iscrowd"]]
            assert len(objects) == len(scene.instances)
            assert (kind == "empty") == (not anns)
            for ann, instance in zip(objects, scene.instances):
                decoded = coco.annToMask(ann).astype(bool)
                assert _iou(decoded, instance.mask) >= 0.95
                assert ann["category_id"] == CATEGORY_IDS[instance.label]
                assert ann["bbox"] == _bbox(instance.mask) == _bbox(decoded)
                assert ann["area"] == instance.mask.sum()
                if isinstance(ann["segmentation"], list):
                    num_polygons += 1
                    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
                    assert all(isinstance(v, float) for p in ann["segmentation"] for v in p)
                else:  # only masks with holes (rings) fall back to compressed RLE
                    assert isinstance(ann["segmentation"]["counts"], str)
                    assert (ndimage.binary_fill_holes(instance.mask) != instance.mask).any()

            crowds = [a for a in anns if a["iscrowd"]]
            assert len(crowds) == (scene.crowd is not None)
            for ann in crowds:
                num_crowds += 1
                rle = ann["segmentation"]
                assert isinstance(rle["counts"], list) and rle["size"] == [64, 64]
                decoded = _decode(rle, 64, 64)
                assert np.array_equal(decoded, scene.crowd.mask)
                assert np.array_equal(coco.annToMask(ann).astype(bool), decoded)
                assert ann["bbox"] == _bbox(decoded) and ann["area"] == decoded.sum()
                assert ann["category_id"] == CATEGORY_IDS[scene.crowd.label]
    assert num_crowds >= 2 and num_polygons >= 10


def test_crowd_regions_lie_in_a_corner_clear_of_the_objects() -> None:
    for seed in range(30):
        scene = render_coco_scene(np.random.default_rng(seed), 96, "crowd")
        assert scene.crowd is not None and 1 <= len(scene.instances) <= shapes_coco.MAX_OBJECTS
        others = np.zeros_like(scene.crowd.mask)
        for instance in scene.instances:
            others |= instance.mask
        assert not (_grow(others) & scene.crowd.mask).any(), "a crowd touches a normal object"
        rows, cols = np.nonzero(scene.crowd.mask)
        corner = 0.4 * 96
        assert (rows.max() < corner or rows.min() >= 96 - corner) and (cols.max() < corner or cols.min() >= 96 - corner)
        pieces = ndimage.label(scene.crowd.mask, structure=np.ones((3, 3)))[1]
        assert pieces <= shapes_coco.CROWD_SIZE[1]


@pytest.mark.parametrize("label", range(len(SHAPE_CLASSES)))
def test_segmentation_decodes_to_the_mask_for_every_class(label: int) -> None:
    rng = np.random.default_rng(label)
    for size in (32, 48, 96):
        scene = render_scene(rng, size, [label] * 2, 0.15, 0.45, allow_overlap=False, min_visible_pixels=1)
        for instance in scene.instances:
            segmentation = shapes_coco._annotation(1, 1, instance, iscrowd=False)["segmentation"]
            decoded = _decode(segmentation, size, size)
            assert _iou(decoded, instance.mask) >= 0.95
            has_hole = (ndimage.binary_fill_holes(instance.mask) != instance.mask).any()
            assert isinstance(segmentation, dict) == has_hole


def test_uncompressed_rle_round_trips() -> None:
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), rng.random((9, 4)) < 0.5, rng.random((16, 16)) < 0.1]
    masks[2][0, 0] = True  # the counts must then start with an empty 0-run
    for mask in masks:
        rle = shapes_coco._uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size and rle["size"] == list(mask.shape)
        assert all(isinstance(c, int) for c in rle["counts"])
        assert np.array_equal(_decode(rle, *mask.shape), mask)


def test_dataset_is_deterministic_per_seed(small_coco: Path, tmp_path: Path) -> None:
    same = write_coco_dataset(tmp_path / "same", seed=0, **SMALL)
    other = write_coco_dataset(tmp_path / "other", seed=1, **SMALL)
    files = sorted(p.relative_to(small_coco) for p in small_coco.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    assert all((small_coco / f).read_bytes() == (same / f).read_bytes() for f in files)
    jpegs = [f for f in files if f.suffix == ".jpg"]
    assert all((small_coco / f).read_bytes() != (other / f).read_bytes() for f in jpegs)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}2017.json"
        assert (small_coco / name).read_bytes() != (other / name).read_bytes()


def test_matching_manifest_is_a_no_op_and_changes_regenerate(tmp_path: Path) -> None:
    root = write_coco_dataset(tmp_path / "coco", **SMALL)
    before = _snapshot(root)
    assert write_coco_dataset(tmp_path / "coco", **SMALL) == root
    assert _snapshot(root) == before

    write_coco_dataset(root, overwrite=True, **SMALL)
    jpegs = [k for k in before if k.endswith(".jpg")]
    assert all(_snapshot(root)[k][0] != before[k][0] for k in jpegs), "files were not rewritten"

    write_coco_dataset(root, **{**SMALL, "image_size": 48, "num_val": 3})
    assert json.loads((root / "manifest.json").read_text())["image_size"] == 48
    assert len(list((root / "val2017").iterdir())) == 3
    with Image.open(root / "train2017" / "000000000001.jpg") as image:
        assert image.size == (48, 48)


def test_interrupted_generation_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shapes_coco.render_coco_scene
    calls = {"n": 0}

    def failing(*args: object) -> shapes_coco.CocoScene:
        calls["n"] += 1
        if calls["n"] > 14:  # in the val split
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shapes_coco, "render_coco_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        write_coco_dataset(tmp_path / "coco", **SMALL)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    killed = tmp_path / ".coco.tmp-999-deadbeef"  # what a SIGKILLed run leaves behind
    (killed / "annotations").mkdir(parents=True)
    monkeypatch.setattr(shapes_coco, "render_coco_scene", real)
    root = write_coco_dataset(tmp_path / "coco", **SMALL)
    assert len(list(root.rglob("*.jpg"))) == 18
    assert not killed.exists()


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="root"):
        write_coco_dataset(tmp_path / "coco", **SMALL)
    assert (tmp_path / "coco" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": -1}, "num_val"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as error:
        write_coco_dataset(tmp_path / "x", **{**SMALL, **kwargs})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "x").exists()


def test_render_coco_scene_rejects_bad_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        render_coco_scene(np.random.default_rng(0), 64, "crowded")


def test_ensure_demo_coco_and_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shapes_coco, "write_coco_dataset", functools.partial(write_coco_dataset, **SMALL))
    path = ensure_demo_coco(tmp_path / "demo")
    assert path == tmp_path / "demo" / "coco"
    assert len(list((path / "train2017").iterdir())) == 12
    before = _snapshot(path)
    assert shapes_coco.main(["--root", str(tmp_path / "demo")]) == path
    assert capsys.readouterr().out.strip() == str(path)
    assert _snapshot(path) == before


@pytest.mark.slow
def test_default_demo_dataset(tmp_path: Path) -> None:
    path = ensure_demo_coco(tmp_path / "demo")
    for split, count in (("train", shapes_coco.DEMO_NUM_TRAIN), ("val", shapes_coco.DEMO_NUM_VAL)):
        coco = _load(path, split)
        assert len(coco.imgs) == count
        empty = sum(not coco.getAnnIds(imgIds=i) for i in coco.imgs)
        crowds = sum(a["iscrowd"] for a in coco.dataset["annotations"])
        assert 0.04 * count <= empty <= 0.06 * count + 1 and 0.04 * count <= crowds <= 0.06 * count + 1
        assert {img["width"] for img in coco.dataset["images"]} == {128}
