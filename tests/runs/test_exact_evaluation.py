"""Exact evaluation: an undecodable val/test image is never replaced by another sample. By default it stops the run
with one line naming the file (exit 2, also from a DataLoader worker); with ``data.eval_undecodable: exclude`` it is
left out of the metric exactly as if it were not in the dataset, and counted. Training keeps its counted skip."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch

import backbones  # noqa: F401  (registers strata_hybrid_pico with timm)
from core.errors import ConfigError, DataError
from datamodules.ade20k import collate_segmentation_excluding
from datamodules.coco import COCODataModule, collate_detection_excluding
from datamodules.decode import DecodeError, ExcludedSample, ExcludedSamples, decode_rgb, excluded_samples
from datamodules.image_folder import ImageFolderDataset, collate_classification_excluding
from datamodules.shapes_ade20k import write_ade20k_dataset
from datamodules.shapes_coco import write_coco_dataset
from tasks.coco_evaluation import CocoEvaluator
from tasks.detection import DetectionTask
from tests.support.cli import REPO, TINY_CLASSIFY, TINY_DETECT, TINY_SEGMENT, train_args
from train import cli_main, main

# NOTE: bad images may be up to half of these tiny sets; one epoch
LENIENT = ["--data.init_args.max_skipped_fraction", "0.5", "--trainer.max_epochs", "1", "--allow_untrained", "true"]
EXCLUDE = ("--data.init_args.eval_undecodable", "exclude")


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DecodeError):
        decode_rgb(path)  # NOTE: the fixture checks itself: this file really does not decode
    return path


def _one_error_line(capsys: pytest.CaptureFixture, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "Traceback" not in errors[0] and "DataLoader worker" not in errors[0]
    return errors[0]


def _excluded_fit_matches_clean_validate(argv: Callable[..., list[str]], data: Path, clean: Path, run: Path) -> dict:
    """Fit ``run`` on ``data`` excluding its undecodable val image, validate the same weights on ``clean`` (that image
    removed from the split): the val metrics must be equal. Returns the fit's ``summary.json``."""
    fitted = cli_main(argv("fit", data, run.parent, *EXCLUDE)).trainer.callback_metrics
    checkpoint = ("--ckpt_path", str(run / "best.ckpt"))
    reference = cli_main(argv("validate", clean, run.parent / "clean", *checkpoint)).trainer.callback_metrics
    names = {k for k in reference if k.startswith("val/") and k != "val/excluded_images"}
    assert any(float(reference[k]) > 0 for k in names)  # NOTE: equal zeros would prove nothing
    assert len(names) >= 3 and {k: float(fitted[k]) for k in names} == {k: float(reference[k]) for k in names}
    assert float(fitted["val/excluded_images"]) == 1 and float(reference["val/excluded_images"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["excluded_eval_images"] == 1 and summary["final_metrics"]["val/excluded_images"] == 1
    assert summary["skipped_samples"] == 1  # the bad training image: replaced and counted, as before
    return summary


# ----- classification (ImageNet layout) -----


def _classify(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    task = [*TINY_CLASSIFY, "--data.init_args.batch_size", "16", "--model.init_args.ema_decay", "null"]
    return train_args(subcommand, task, data, out, "cls", "--data.init_args.eval_batch_size", "1", *LENIENT, *extra)


@pytest.fixture
def imagenet_copy(tiny_imagenet: Path, tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    shutil.copytree(tiny_imagenet, root)
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_classification_stops_at_an_undecodable_val_image_naming_it(
    imagenet_copy: Path, tmp_path: Path, workers: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _truncate(sorted((imagenet_copy / "val").rglob("*.*"))[0])
    argv = _classify("validate", imagenet_copy, tmp_path / "runs", "--data.init_args.num_workers", workers)
    line = _one_error_line(capsys, argv, monkeypatch)
    assert line.startswith(f"error: cannot decode evaluation image {bad} (")
    assert "--data.init_args.eval_undecodable exclude" in line


def test_classification_excludes_exactly_and_counts(imagenet_copy: Path, tmp_path: Path) -> None:
    _truncate(sorted((imagenet_copy / "train").rglob("*.*"))[5])  # training keeps its counted skip
    clean = tmp_path / "clean"
    shutil.copytree(imagenet_copy, clean)
    bad = _truncate(sorted((imagenet_copy / "val").rglob("*.*"))[-1])
    (clean / bad.relative_to(imagenet_copy)).unlink()  # the same val split without that image
    summary = _excluded_fit_matches_clean_validate(_classify, imagenet_copy, clean, tmp_path / "runs" / "cls")
    assert {"val/top1", "val/top5", "val/loss"} <= set(summary["final_metrics"])  # over the 31 decoded images


@pytest.mark.slow  # NOTE: two gloo processes started through train.py (~50 s on 2 shared cores)
def test_classification_exclusion_under_ddp_is_summed_over_processes(imagenet_copy: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    shutil.copytree(imagenet_copy, clean)
    bad = _truncate(sorted((imagenet_copy / "val").rglob("*.*"))[7])  # NOTE: rank 1's; rank 0 writes metrics.csv
    (clean / bad.relative_to(imagenet_copy)).unlink()
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", *EXCLUDE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "train.py", *_classify("validate", imagenet_copy, tmp_path / "runs", *ddp)]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "runs" / "cls" / "validate" / "metrics.csv") as f:
        (logged,) = list(csv.DictReader(f))
    reference = cli_main(_classify("validate", clean, tmp_path / "clean_runs")).trainer.callback_metrics
    assert float(logged["val/excluded_images"]) == 1  # one process excluded it, the other none: summed
    assert float(logged["val/top1"]) == float(reference["val/top1"])  # torchmetrics state: exact across processes
    assert float(logged["val/top5"]) == float(reference["val/top5"])


def test_classification_predict_writes_no_row_for_an_excluded_image(imagenet_copy: Path, tmp_path: Path) -> None:
    files = sorted((imagenet_copy / "val").rglob("*.*"))
    bad = _truncate(files[9])  # NOTE: inside the second batch of 8, so the rows after it must shift
    cli_main(_classify("predict", imagenet_copy, tmp_path / "runs", *EXCLUDE, "--data.init_args.eval_batch_size", "8"))
    with open(tmp_path / "runs" / "cls" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [str(f) for f in files if f != bad]
    classes = sorted(p.name for p in (imagenet_copy / "val").iterdir())
    assert all(int(row["label"]) == classes.index(Path(row["path"]).parent.name) for row in rows)


def test_classification_predict_stops_at_an_undecodable_image_by_default(
    imagenet_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _truncate(sorted((imagenet_copy / "val").rglob("*.*"))[0])
    line = _one_error_line(capsys, _classify("predict", imagenet_copy, tmp_path / "runs"), monkeypatch)
    assert line.startswith(f"error: cannot decode evaluation image {bad} (")
    predictions = tmp_path / "runs" / "cls" / "predictions.csv"
    assert not predictions.exists() or len(predictions.read_text().splitlines()) <= 1  # no row, at most the header


# ----- detection (COCO layout) -----


def _detect(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    task = [*TINY_DETECT, "--model.init_args.detector_kwargs.box_score_thresh", "0.0"]
    return train_args(subcommand, task, data, out, "det", "--data.init_args.eval_batch_size", "1", *LENIENT, *extra)


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    root = write_coco_dataset(tmp_path / "coco", num_train=4, num_val=5, image_size=64)
    # NOTE: full-image val objects, which the full-image detections of _validate_full_image_detector match
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    size = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    for ann in data["annotations"]:
        w, h = size[ann["image_id"]]
        ann.update(bbox=[0.0, 0.0, float(w), float(h)], area=float(w * h), segmentation=[[0, 0, w, 0, w, h, 0, h]])
    path.write_text(json.dumps(data))
    return root


def test_detection_stops_at_an_undecodable_val_image_naming_it(
    coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _truncate(sorted((coco / "val2017").iterdir())[1])
    line = _one_error_line(capsys, _detect("validate", coco, tmp_path / "runs"), monkeypatch)
    assert line.startswith(f"error: cannot decode evaluation image {bad} (")


def _without_last_val_image(coco: Path, clean: Path) -> int:
    """Truncate ``coco``'s last val image and return its id; ``clean`` becomes a copy without it: file, image entry
    and annotations."""
    shutil.copytree(coco, clean)
    bad = _truncate(sorted((coco / "val2017").iterdir())[-1])  # NOTE: after the first val_overlays images
    annotations = clean / "annotations" / "instances_val2017.json"
    data = json.loads(annotations.read_text())
    bad_id = next(image["id"] for image in data["images"] if image["file_name"] == bad.name)
    assert any(ann["image_id"] == bad_id for ann in data["annotations"])  # its ground truth must leave with it
    data["images"] = [image for image in data["images"] if image["id"] != bad_id]
    data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] != bad_id]
    annotations.write_text(json.dumps(data))
    (clean / "val2017" / bad.name).unlink()
    return bad_id


def _validate_full_image_detector(root: Path, eval_undecodable: str) -> dict[str, float]:
    """``Trainer.validate`` of a ``DetectionTask`` whose detector is replaced by fixed full-image detections: one per
    class per image, scored from the image's pixels, so COCOeval's figures are well above 0 without any training."""
    datamodule = COCODataModule(
        root=str(root),
        with_masks=True,
        img_scale=(64, 64),
        eval_batch_size=1,
        num_workers=0,
        eval_undecodable=eval_undecodable,
    )
    task = DetectionTask(
        "strata_hybrid_pico",
        num_classes=datamodule.num_classes,
        fpn_channels=16,
        roi_head_width=16,
        dataset_info=datamodule.dataset_info,
    )
    labels = torch.arange(1, datamodule.num_classes + 1)

    def detect(images: list[torch.Tensor], output_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image, (h, w) in zip(images, output_sizes, strict=True):
            scores = torch.rand(len(labels), generator=torch.Generator().manual_seed(int(image.sum() * 1000)))
            box = torch.tensor([[0.0, 0.0, w, h]]).repeat(len(labels), 1)
            out.append({"boxes": box, "labels": labels, "scores": scores, "masks": torch.ones(len(labels), 1, h, w)})
        return out

    task.forward = detect
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return trainer.validate(task, datamodule=datamodule, verbose=False)[0]


def test_detection_excludes_the_image_from_cocoeval_exactly(coco: Path, tmp_path: Path) -> None:
    _without_last_val_image(coco, tmp_path / "clean")
    excluded = _validate_full_image_detector(coco, "exclude")
    reference = _validate_full_image_detector(tmp_path / "clean", "error")
    assert excluded.pop("val/excluded_images") == 1 and reference.pop("val/excluded_images") == 0
    assert 0 < reference["val/bbox_AP"] < 1 and 0 < reference["val/segm_AP"] < 1  # NOTE: equal zeros prove nothing
    assert excluded == reference  # all 24 COCOeval figures, bbox and segm


def test_detection_fit_counts_the_excluded_image_and_predicts_none_for_it(coco: Path, tmp_path: Path) -> None:
    _truncate(sorted((coco / "train2017").iterdir())[2])  # an image with instances: training keeps its counted skip
    bad_id = _without_last_val_image(coco, tmp_path / "clean")
    fitted = cli_main(_detect("fit", coco, tmp_path / "runs", *EXCLUDE)).trainer.callback_metrics
    summary = json.loads((tmp_path / "runs" / "det" / "summary.json").read_text())
    assert float(fitted["val/excluded_images"]) == 1 and summary["final_metrics"]["val/excluded_images"] == 1
    assert summary["excluded_eval_images"] == 1 and summary["skipped_samples"] == 1
    assert {"val/bbox_AP", "val/segm_AP"} <= set(summary["final_metrics"])

    cli_main(_detect("predict", coco, tmp_path / "runs", *EXCLUDE))
    records = json.loads((tmp_path / "runs" / "det" / "predictions_coco.json").read_text())
    assert records and bad_id not in {r["image_id"] for r in records}  # no result records for the excluded image


# ----- segmentation (ADE20K layout) -----


def _segment(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(subcommand, TINY_SEGMENT, data, out, "seg", *LENIENT, *extra)


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    return write_ade20k_dataset(tmp_path / "ade", num_train=4, num_val=4, image_size=64)


def test_segmentation_stops_at_an_undecodable_val_image_naming_it(
    ade: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _truncate(sorted((ade / "images" / "validation").iterdir())[2])
    line = _one_error_line(capsys, _segment("validate", ade, tmp_path / "runs"), monkeypatch)
    assert line.startswith(f"error: cannot decode evaluation image {bad} (")


def test_segmentation_excludes_the_pair_from_the_confusion_matrix_exactly(ade: Path, tmp_path: Path) -> None:
    _truncate(sorted((ade / "images" / "training").iterdir())[1])
    clean = tmp_path / "clean"
    shutil.copytree(ade, clean)
    bad = _truncate(sorted((ade / "images" / "validation").iterdir())[0])  # NOTE: an all-excluded first batch
    (clean / "images" / "validation" / bad.name).unlink()
    (clean / "annotations" / "validation" / f"{bad.stem}.png").unlink()
    summary = _excluded_fit_matches_clean_validate(_segment, ade, clean, tmp_path / "runs" / "seg")
    assert {"val/mIoU", "val/mAcc", "val/aAcc"} <= set(summary["final_metrics"])

    cli_main(_segment("predict", ade, tmp_path / "runs", *EXCLUDE))
    written = sorted(p.stem for p in (tmp_path / "runs" / "seg" / "predictions").glob("*.png"))
    assert written == sorted(p.stem for p in (clean / "images" / "validation").iterdir())  # none for the excluded


# ----- the pieces -----


def test_excluding_collates_drop_the_markers_and_handle_an_all_excluded_batch() -> None:
    marker = ExcludedSample(index=1, key=7, reason="x.jpg (3 bytes): OSError: truncated")
    image, mask = torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.int64)
    images, labels, excluded = collate_classification_excluding([(image, 3), marker, (image, 5)])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [3, 5] and excluded == [marker]
    assert isinstance(excluded, ExcludedSamples) and excluded_samples((images, labels, excluded)) == [marker]
    images, targets, excluded = collate_detection_excluding([marker, (image, {"image_id": 2})])
    assert len(images) == 1 and [t["image_id"] for t in targets] == [2] and excluded == [marker]
    batch = collate_segmentation_excluding([(image, mask, {"name": "a"}), marker])
    assert batch[0].shape == (1, 3, 4, 4) and [m["name"] for m in batch[2]] == ["a"] and batch[3] == [marker]
    for collate in (collate_classification_excluding, collate_detection_excluding, collate_segmentation_excluding):
        empty = collate([marker])
        assert len(empty[0]) == 0 and len(empty[1]) == 0 and excluded_samples(empty) == [marker]
    assert excluded_samples((images, labels)) == []  # a batch of the default shape excluded nothing


def test_an_excluded_image_returns_a_marker_and_the_default_raises(tmp_path: Path) -> None:
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")

    def transform(image):
        return {"image": torch.tensor(np.asarray(image)).permute(2, 0, 1).float()}

    samples = [(str(good), 0), (str(bad), 1)]
    dataset = ImageFolderDataset(samples, transform, undecodable="exclude")
    assert dataset.skip_counter is None  # nothing to count there: evaluation never replaces
    marker = dataset[1]
    assert isinstance(marker, ExcludedSample) and (marker.index, marker.key) == (1, 1)
    assert marker.reason.startswith(f"{bad} (0 bytes)") and dataset[0][1] == 0
    with pytest.raises(DataError, match=rf"cannot decode evaluation image {bad} \(0 bytes\)") as info:
        ImageFolderDataset(samples, transform, undecodable="error")[1]
    assert "\n" not in str(info.value)


def test_coco_evaluator_leaves_excluded_ids_out_of_imgids(tmp_path: Path) -> None:
    evaluator = CocoEvaluator(tmp_path / "instances_val.json")  # NOTE: the file is read only by compute()
    evaluator.update([{"image_id": 1}], [1, 2])
    evaluator.update([], [], excluded_ids=[3])
    evaluator.update([], [4], excluded_ids=[4])  # NOTE: excluded wins: never scored, even if listed as seen
    assert evaluator.evaluated_ids == [1, 2] and evaluator.excluded_ids == {3, 4}


def test_a_worker_error_keeps_its_one_line_message() -> None:
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> None:
            raise DataError(f"cannot decode evaluation image /data/val/{index}.jpg (0 bytes): fix: it")

    with pytest.raises(DataError) as info:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(info.value) == "cannot decode evaluation image /data/val/0.jpg (0 bytes): fix: it"


@pytest.mark.parametrize(
    "datamodule",
    [
        "datamodules.imagenet.ImageNetDataModule",
        "datamodules.coco.COCODataModule",
        "datamodules.ade20k.ADE20KDataModule",
    ],
)
def test_eval_undecodable_is_validated_in_one_line(datamodule: str, tmp_path: Path) -> None:
    import importlib

    module, name = datamodule.rsplit(".", 1)
    with pytest.raises(ConfigError, match=r"data.eval_undecodable 'skip' is not a policy: use 'error'") as info:
        getattr(importlib.import_module(module), name)(root=str(tmp_path), eval_undecodable="skip")
    assert "\n" not in str(info.value)
