"""COCO datamodule: category mapping, crowd/degenerate/empty handling, mask decoding, transforms, loaders, errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from core.errors import ConfigError, DataError
from datamodules.coco import COCODataModule, collate_detection
from datamodules.samplers import UnpaddedDistributedSampler

# listed out of order on purpose: labels follow the sorted ids
CATEGORIES = [(10, "ten"), (3, "three"), (15, "fifteen"), (7, "seven")]
SORTED_IDS = [3, 7, 10, 15]
# (image id, file, height, width)
IMAGES = [(11, "a.png", 40, 60), (20, "b.png", 60, 40), (35, "c.png", 40, 60), (41, "d.png", 40, 60)]


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return (((x + 0.5 - cx) / rx) ** 2 + ((y + 0.5 - cy) / ry) ** 2 <= 1).astype(np.uint8)


def _rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode("ascii"), "size": list(mask.shape)}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F")
    edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(edges).tolist()
    return {"counts": ([0] if flat[0] else []) + counts, "size": list(mask.shape)}


def _polygon_box(polygons: list, h: int, w: int) -> list[float]:
    return mask_utils.toBbox(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).tolist()


def _annotations() -> tuple[list[dict], dict[int, np.ndarray]]:
    """Annotations and, for the instances that must survive, their expected full-size masks by annotation id."""
    anns: list[dict] = []
    masks: dict[int, np.ndarray] = {}

    def add(image_id: int, cat: int, seg: object, bbox: list[float], crowd: int = 0) -> int:
        ann = dict(id=len(anns) + 1, image_id=image_id, category_id=cat, segmentation=seg, bbox=bbox, iscrowd=crowd)
        anns.append({**ann, "area": float(bbox[2] * bbox[3])})
        return len(anns)

    # image 11 (40x60): polygon, compressed RLE, a crowd region, a zero-width box, a box fully right of the image
    poly = [[5.0, 4.0, 25.0, 4.0, 25.0, 20.0, 5.0, 20.0]]
    masks[add(11, 3, poly, _polygon_box(poly, 40, 60))] = _rect(40, 60, 5, 4, 25, 20)
    ellipse = _ellipse(40, 60, 42, 14, 12, 8)
    ellipse_box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(ellipse))).tolist()
    masks[add(11, 7, _compressed_rle(ellipse), ellipse_box)] = ellipse
    add(11, 3, _uncompressed_rle(_rect(40, 60, 40, 25, 55, 35)), [40.0, 25.0, 15.0, 10.0], crowd=1)
    add(11, 10, [[30.0, 10.0, 30.5, 10.0, 30.5, 18.0, 30.0, 18.0]], [30.0, 10.0, 0.0, 8.0])
    add(11, 10, [[70.0, 5.0, 80.0, 5.0, 80.0, 15.0, 70.0, 15.0]], [70.0, 5.0, 10.0, 10.0])
    # image 20 (60x40, portrait): non-crowd uncompressed RLE, a triangle polygon, a box half outside the image
    rect = _rect(60, 40, 8, 30, 30, 55)
    masks[add(20, 10, _uncompressed_rle(rect), [8.0, 30.0, 22.0, 25.0])] = rect
    tri = [[2.0, 2.0, 20.0, 2.0, 11.0, 22.0]]
    masks[add(20, 15, tri, _polygon_box(tri, 60, 40))] = mask_utils.decode(
        mask_utils.merge(mask_utils.frPyObjects(tri, 60, 40))
    )
    half_out = [[30.0, 50.0, 50.0, 50.0, 50.0, 70.0, 30.0, 70.0]]
    masks[add(20, 7, half_out, [30.0, 50.0, 20.0, 20.0])] = _rect(60, 40, 30, 50, 40, 60)
    # image 35: nothing; image 41: only a crowd region
    add(41, 15, _uncompressed_rle(_rect(40, 60, 0, 0, 10, 10)), [0.0, 0.0, 10.0, 10.0], crowd=1)
    return anns, masks


EXPECTED_MASKS = _annotations()[1]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    anns, _ = _annotations()
    data = {
        "info": {},
        "licenses": [],
        "images": [dict(id=i, file_name=f, height=h, width=w) for i, f, h, w in IMAGES],
        "categories": [dict(id=i, name=n, supercategory="thing") for i, n in CATEGORIES],
        "annotations": anns,
    }
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        for _, name, h, w in IMAGES:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / name)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _dm(root: Path, **kwargs) -> COCODataModule:
    kwargs = {"img_scale": (60, 40), "num_workers": 0, "hflip": 0.0, **kwargs}
    return COCODataModule(root=str(root), **kwargs)


def _samples(dataset) -> dict[int, tuple[torch.Tensor, dict]]:
    return {target["image_id"]: (image, target) for image, target in (dataset[i] for i in range(len(dataset)))}


def _box_of(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def test_category_ids_round_trip_through_contiguous_labels(coco_root: Path) -> None:
    dm = _dm(coco_root)
    assert dm.num_classes == 4 and dm.category_ids == SORTED_IDS  # known before setup, for the CLI link
    assert dm.class_names == ["three", "seven", "ten", "fifteen"]
    for label in range(1, 5):
        assert dm.category_id_to_label(dm.label_to_category_id(label)) == label
    for cat_id in SORTED_IDS:
        assert dm.label_to_category_id(dm.category_id_to_label(cat_id)) == cat_id
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        dm.label_to_category_id(0)
    with pytest.raises(ValueError, match="category id 4"):
        dm.category_id_to_label(4)
    dm.setup("validate")
    _, target = _samples(dm.val_set)[20]
    assert [dm.label_to_category_id(int(v)) for v in target["labels"]] == [10, 15, 7]


def test_crowd_degenerate_and_empty_are_left_out_and_counted(coco_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="datamodules.coco")
    dm = _dm(coco_root)
    dm.setup("fit")
    train, val = _samples(dm.train_set), _samples(dm.val_set)
    # image 35 has no annotation and image 41 only a crowd one: skipped in train, evaluated in val
    assert sorted(train) == [11, 20] and sorted(val) == [11, 20, 35, 41]
    for image_id in (35, 41):
        _, target = val[image_id]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    # image 11 keeps the polygon and RLE instances; the crowd region and both degenerate boxes are gone
    boxes = train[11][1]["boxes"]
    assert train[11][1]["labels"].tolist() == [dm.category_id_to_label(3), dm.category_id_to_label(7)]
    assert not any(torch.allclose(b, torch.tensor([40.0, 25.0, 55.0, 35.0])) for b in boxes)
    torch.testing.assert_close(boxes[0], torch.tensor([5.0, 4.0, 25.0, 20.0]))
    # the half-outside box is clipped to the image, not dropped
    torch.testing.assert_close(train[20][1]["boxes"][2], torch.tensor([30.0, 50.0, 40.0, 60.0]))
    expected = dict(images=2, instances=5, crowd_annotations=2, degenerate_boxes=2, empty_images=2)
    expected.update(invalid_boxes=0, stored_frame_images=0)
    assert dm.counts["train"] == {**expected, "empty_images_skipped": 2}
    assert dm.counts["val"] == {**expected, "images": 4, "empty_images_skipped": 0}
    assert "coco train: 2 degenerate and 0 non-finite boxes dropped, 2 empty images skipped" in caplog.text
    kept = _dm(coco_root, skip_empty_train=False)
    kept.setup("fit")
    assert len(kept.train_set) == 4 and kept.train_set.counts["empty_images_skipped"] == 0


def test_polygon_and_rle_masks_decode(coco_root: Path) -> None:
    dm = _dm(coco_root, with_masks=True)
    dm.setup("validate")
    samples = _samples(dm.val_set)
    for image_id, (image, target) in samples.items():
        ann_ids = dm.val_set.records[dm.val_set.image_ids.index(image_id)].ann_ids
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape[1:] == image.shape[1:]
        assert len(target["masks"]) == len(target["boxes"]) == len(ann_ids)
        # img_scale (60, 40) is scale 1 for both orientations: masks compare pixel for pixel
        for mask, ann_id in zip(target["masks"], ann_ids):
            np.testing.assert_array_equal(mask.numpy(), EXPECTED_MASKS[ann_id])
    # polygon (1), compressed RLE (2), uncompressed RLE (6), triangle polygon (7), clipped polygon (8)
    assert sorted(a for r in dm.val_set.records for a in r.ann_ids) == sorted(EXPECTED_MASKS) == [1, 2, 6, 7, 8]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_scale=(150, 100)),
        dict(img_scale=(150, 100), hflip=1.0),
        dict(img_scale=(150, 100), multi_scale=[30, 64, 100], hflip=0.5),
        dict(img_scale=(64, 64), large_scale_jitter=(0.5, 2.0), hflip=0.5),
    ],
    ids=["resize", "hflip", "multi_scale", "lsj"],
)
def test_train_transforms_keep_boxes_inside_and_aligned_with_masks(coco_root: Path, kwargs: dict) -> None:
    dm = _dm(coco_root, with_masks=True, **kwargs)
    dm.setup("fit")
    sizes = set()
    for seed in range(6):
        dm.train_set.reseed(seed)
        for image, target in (dm.train_set[i] for i in range(len(dm.train_set))):
            h, w = image.shape[1:]
            sizes.add((h, w))
            assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
            boxes, masks = target["boxes"], target["masks"]
            assert len(boxes) == len(masks) == len(target["labels"])
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            for box, mask in zip(boxes, masks):
                torch.testing.assert_close(_box_of(mask), box, atol=2.0, rtol=0)
    if "large_scale_jitter" in kwargs:
        assert sizes == {(64, 64)}  # cropped / padded to img_scale
    elif "multi_scale" in kwargs:
        assert len(sizes) > 2  # several scales were drawn


def test_hflip_mirrors_image_boxes_and_masks(coco_root: Path) -> None:
    plain, flipped = _dm(coco_root, with_masks=True), _dm(coco_root, with_masks=True, hflip=1.0)
    plain.setup("fit")
    flipped.setup("fit")
    for index in range(len(plain.train_set)):
        (image, target), (image_f, target_f) = plain.train_set[index], flipped.train_set[index]
        w = image.shape[-1]
        torch.testing.assert_close(image_f, image.flip(-1))
        torch.testing.assert_close(target_f["masks"], target["masks"].flip(-1))
        mirrored = torch.stack([w - target["boxes"][:, 2], target["boxes"][:, 1], w - target["boxes"][:, 0]], dim=1)
        torch.testing.assert_close(target_f["boxes"][:, :3], mirrored, atol=1e-4, rtol=0)
        assert torch.equal(target_f["labels"], target["labels"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(img_scale=(100, 47)), dict(img_scale=(72, 60)), dict(img_scale=(150, 100), multi_scale=[30, 70])],
    ids=["short_bound", "long_bound", "multi_scale"],
)
def test_scale_maps_boxes_back_to_the_original_image(coco_root: Path, kwargs: dict) -> None:
    dm = _dm(coco_root, **kwargs)
    dm.setup("fit")
    long_max, short_max = kwargs["img_scale"]
    for dataset in (dm.train_set, dm.val_set):
        for index, record in enumerate(dataset.records):
            image, target = dataset[index]
            h, w = image.shape[1:]
            assert target["orig_size"] == (record.height, record.width)
            sy, sx = target["scale"]
            assert (sy, sx) == (h / record.height, w / record.width)
            # keep-ratio resize: both sides within the budget, one of them (up to rounding) at its bound
            shorts = kwargs.get("multi_scale", [short_max]) if dataset is dm.train_set else [short_max]
            assert max(h, w) <= long_max + 0.5 and min(h, w) <= max(shorts) + 0.5
            assert max(h, w) >= long_max - 0.5 or any(abs(min(h, w) - s) <= 0.5 for s in shorts)
            back = target["boxes"] / torch.tensor([sx, sy, sx, sy])
            torch.testing.assert_close(back, torch.from_numpy(record.boxes), atol=1e-3, rtol=0)


def test_loaders_collate_lists_and_shard_validation(coco_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _dm(coco_root, with_masks=True, batch_size=2, eval_batch_size=3)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert {"boxes", "labels", "masks", "image_id", "orig_size", "scale"} <= set(targets[0])
    assert collate_detection([(images[0], targets[0])]) == ([images[0]], [targets[0]])
    seen = [t["image_id"] for _, batch in dm.val_dataloader() for t in batch]
    assert sorted(seen) == [11, 20, 35, 41]
    assert [t["image_id"] for _, batch in dm.predict_dataloader() for t in batch] == seen
    # under DDP (rank 1 of 2) validation shards without padding: every image once across ranks
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    loader = dm.val_dataloader()
    assert isinstance(loader.sampler, UnpaddedDistributedSampler)
    assert [t["image_id"] for _, batch in loader for t in batch] == dm.val_set.image_ids[1::2]


def test_training_augmentation_is_seeded_and_changes_between_epochs(coco_root: Path) -> None:
    def epoch(dm: COCODataModule, number: int) -> list[tuple]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(number)  # what Lightning does at every epoch start
        return [(t["image_id"], tuple(i.shape), t["boxes"][0, 0].item()) for i, t in _flat(loader)]

    def datamodule() -> COCODataModule:
        dm = _dm(coco_root, img_scale=(150, 100), multi_scale=[30, 50, 70, 100], hflip=0.5, batch_size=1)
        dm.setup("fit")
        return dm

    torch.manual_seed(0)
    dm = datamodule()
    first, second = epoch(dm, 0), epoch(dm, 1)
    torch.manual_seed(0)
    assert epoch(datamodule(), 0) == first  # the seed fixes shuffling, scales and flips
    assert second != first  # but each epoch draws new ones


def _flat(loader) -> list[tuple[torch.Tensor, dict]]:
    return [(image, target) for images, targets in loader for image, target in zip(images, targets)]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line_error(match: str, **kwargs) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        COCODataModule(num_workers=0, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def test_missing_paths_are_one_line_errors(coco_root: Path, tmp_path: Path) -> None:
    _one_line_error(r"COCO root .*nowhere does not exist", root=str(tmp_path / "nowhere"))
    root = _copy(coco_root, tmp_path / "ds")
    (root / "annotations" / "instances_val2017.json").unlink()
    _one_line_error(r"missing annotation file .*ds/annotations/instances_val2017.json.*val_annotations", root=str(root))
    _one_line_error(r"missing image folder .*/elsewhere.*train_images", root=str(coco_root), train_images="elsewhere")


def test_non_coco_annotation_files_are_one_line_errors(coco_root: Path, tmp_path: Path) -> None:
    root = _copy(coco_root, tmp_path / "ds")
    val = root / "annotations" / "instances_val2017.json"
    val.write_text(json.dumps({"images": [], "annotations": []}))
    _one_line_error(r"instances_val2017.json is not a COCO annotation file \(no 'categories'\)", root=str(root))
    val.write_text("{not json")
    _one_line_error(r"instances_val2017.json is not valid JSON", root=str(root))


def test_data_problems_found_at_setup(coco_root: Path, tmp_path: Path) -> None:
    root = _copy(coco_root, tmp_path / "ds")
    (root / "val2017" / "b.png").unlink()
    dm = _dm(root)
    with pytest.raises(DataError, match=r"missing image .*val2017/b.png"):
        dm.setup("validate")
        _samples(dm.val_set)
    train = root / "annotations" / "instances_train2017.json"
    data = json.loads(train.read_text())
    data["categories"] = data["categories"][:3]
    train.write_text(json.dumps(data))
    with pytest.raises(DataError, match="same categories"):
        _dm(root).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(img_scale=(800, 1333)), "img_scale"),
        (dict(multi_scale=[480, 800], large_scale_jitter=(0.1, 2.0)), "set only one"),
        (dict(hflip=1.5), "hflip"),
        (dict(large_scale_jitter=(2.0, 0.5)), "large_scale_jitter"),
    ],
)
def test_bad_arguments_name_the_argument(coco_root: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        COCODataModule(root=str(coco_root), **kwargs)


def _mmcv_rescaled_hw(height: int, width: int, long_max: int, short_max: int, ratio: float) -> tuple[int, int]:
    """mmdet/mmseg ``Resize(keep_ratio=True)``: ``random_sample_ratio`` then mmcv 1.x ``rescale_size``."""
    long_bound, short_bound = int(long_max * ratio), int(short_max * ratio)
    factor = min(long_bound / max(height, width), short_bound / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def test_keep_ratio_resize_uses_mmcvs_arithmetic() -> None:
    from datamodules.detection_transforms import KeepRatioResize

    rng = np.random.default_rng(0)
    cases = [(5, 10, 5, 100, 1.0), (375, 500, 1333, 800, 1.0), (480, 640, 2048, 512, 0.73)]  # 2.5 rounds up to 3
    cases += [
        (int(rng.integers(20, 900)), int(rng.integers(20, 900)), 1333, 800, float(rng.uniform(0.5, 2.0)))
        for _ in range(200)
    ]
    for height, width, long_max, short_max, ratio in cases:
        resize = KeepRatioResize(long_max, short_max, ratio_range=(ratio, ratio))
        params = resize.get_params_dependent_on_data({"shape": (height, width, 3)}, {})
        assert params["resized_hw"] == _mmcv_rescaled_hw(height, width, long_max, short_max, ratio), (height, width)
    assert _mmcv_rescaled_hw(5, 10, 5, 100, 1.0) == (3, 5)  # Python's round(2.5) would give 2
