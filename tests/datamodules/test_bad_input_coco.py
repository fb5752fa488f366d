"""Broken COCO data: structural problems fail at setup naming the file, undecodable images are skipped (issue 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import DataError
from datamodules.coco import COCODataModule

NAMES = ("a.jpg", "b.jpg", "c.jpg", "d.jpg")


def _write(root: Path, data: dict | None = None) -> Path:
    images = [dict(id=i + 1, file_name=name, height=32, width=48) for i, name in enumerate(NAMES)]
    anns = [
        dict(id=10 + i, image_id=i + 1, category_id=3 + 4 * (i % 2), bbox=[4.0, 4.0, 20.0, 16.0], area=320.0, iscrowd=0)
        for i in range(len(NAMES))
    ]
    data = data or dict(images=images, annotations=anns, categories=[dict(id=3, name="x"), dict(id=7, name="y")])
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(exist_ok=True)
        for i, name in enumerate(NAMES):
            Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)).save(root / split / name)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _dm(root: Path) -> COCODataModule:
    return COCODataModule(root=str(root), img_scale=(48, 32), num_workers=0, hflip=0.0, skip_empty_train=False)


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_missing_image_fails_at_setup_naming_it(tmp_path: Path) -> None:
    root = _write(tmp_path / "coco")
    (root / "train2017" / "c.jpg").unlink()
    with pytest.raises(DataError, match=r"missing image .*train2017/c\.jpg \(1 of the 4 images listed in .*train") as e:
        _dm(root).setup("fit")
    assert "restore them or remove their entries" in _one_line(e)


def test_an_unknown_category_id_fails_naming_the_annotation(tmp_path: Path) -> None:
    root = _write(tmp_path / "coco")
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_train2017.json: annotation 12 has category_id 99") as e:
        _dm(root).setup("fit")
    _one_line(e)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"images": [], "annotations": [', "is not valid JSON"),  # truncated
        ("[1, 2, 3]", r"is not a COCO annotation file \(no 'images', 'annotations', 'categories'\)"),
        ('{"images": [], "annotations": [], "categories": []}', "lists no categories"),
    ],
)
def test_broken_annotation_json_is_one_line_naming_the_file(tmp_path: Path, content: str, match: str) -> None:
    root = _write(tmp_path / "coco")
    (root / "annotations" / "instances_val2017.json").write_text(content)
    with pytest.raises(DataError, match=rf"instances_val2017.json {match}") as e:
        _dm(root)
    _one_line(e)


def test_a_malformed_entry_is_one_line_naming_the_file(tmp_path: Path) -> None:
    root = _write(tmp_path / "coco")
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    del data["annotations"][1]["bbox"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_train2017.json: malformed COCO entry \(KeyError: 'bbox'\)") as e:
        _dm(root).setup("fit")
    _one_line(e)


def test_an_undecodable_image_is_replaced_by_the_next_with_its_own_targets(tmp_path: Path) -> None:
    root = _write(tmp_path / "coco")
    (root / "train2017" / "b.jpg").write_bytes((root / "train2017" / "b.jpg").read_bytes()[:100])  # truncated
    dm = _dm(root)
    dm.setup("fit")
    samples = [dm.train_set[i] for i in range(len(dm.train_set))]
    image_ids = [target["image_id"] for _, target in samples]
    assert image_ids == [1, 3, 3, 4]  # b.jpg (id 2) stands in for nobody; c.jpg (id 3) stands in for it
    stand_in, own = samples[1][1], samples[2][1]
    assert stand_in["labels"].tolist() == own["labels"].tolist() == [1]  # c.jpg's own category (id 3 -> label 1)
    assert dm.train_set.skip_counter.skipped == 1 and dm.train_set.skip_counter.requested == 4


def test_non_finite_boxes_are_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _write(tmp_path / "coco")
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["bbox"] = [float("nan"), 4.0, 20.0, 16.0]
    data["annotations"][2]["bbox"] = [4.0, 4.0, float("inf"), 16.0]
    data["annotations"][3]["bbox"] = [4.0, float("-inf"), 20.0, float("nan")]
    path.write_text(json.dumps(data))  # NOTE: json writes NaN / Infinity, as numpy-fed exporters do
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()
    dm = _dm(root)
    with caplog.at_level("INFO", logger="datamodules.coco"):
        dm.setup("fit")
    assert dm.train_set.counts["invalid_boxes"] == 3 and dm.train_set.counts["instances"] == 1
    boxes = [dm.train_set[i][1]["boxes"] for i in range(len(dm.train_set))]
    assert [len(b) for b in boxes] == [1, 0, 0, 0] and all(torch.isfinite(b).all() for b in boxes)
    assert "coco train: 0 degenerate and 3 non-finite boxes dropped" in caplog.text
    assert dm.val_set.counts["invalid_boxes"] == 0


@pytest.mark.parametrize("bbox", [["4", 4, 20, 16], [None, 4, 20, 16], [4, 4, 20], [4, True, 20, 16], "4 4 20 16"])
def test_a_bbox_that_is_not_four_numbers_is_one_line_naming_the_annotation(tmp_path: Path, bbox: object) -> None:
    root = _write(tmp_path / "coco")
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["bbox"] = bbox
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_train2017.json: annotation 11 has bbox .*, not four numbers") as e:
        _dm(root).setup("fit")
    assert _one_line(e).endswith("[x, y, width, height]: fix the annotation file")
