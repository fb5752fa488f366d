"""The segmentation command line end to end on a tiny shapes ADE20K dataset: fit, then predict PNG label maps."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shapes_ade20k import write_ade20k_dataset
from tasks.segmentation_metrics import SegmentationMetrics
from train import cli_main

REPO = Path(__file__).resolve().parents[1]
SEGMENT_CONFIG = str(REPO / "configs" / "demo" / "segment.yaml")


def _args(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        subcommand,
        "--config",
        SEGMENT_CONFIG,
        "--name",
        "seg",
        "--out_dir",
        str(out),
        "--data.init_args.root",
        str(data),
        "--data.init_args.crop_size",
        "64",
        "--data.init_args.scale",
        "[128, 64]",
        "--data.init_args.eval_short_side",
        "64",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.pretrained_file",
        "null",
        "--model.init_args.backbone_kwargs",
        "{n_win: 2, window_size: 2}",
        "--model.init_args.head_channels",
        "16",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = write_ade20k_dataset(tmp_path_factory.mktemp("ade"), num_train=8, num_val=3, image_size=64)
    out = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    cli_main(_args("fit", data, out, "--trainer.max_epochs", "1"))
    return data, out


def test_predict_pngs_score_like_validation(fitted: tuple[Path, Path]) -> None:
    data, out = fitted
    run = out / "seg"
    with open(run / "metrics.csv") as f:
        logged = [float(r["val/mIoU"]) for r in csv.DictReader(f) if r.get("val/mIoU")][-1]
    cli_main(_args("predict", data, out))
    labels = sorted((data / "annotations" / "validation").glob("*.png"))
    metric = SegmentationMetrics(8)
    for label_file in labels:
        pred_file = run / "predictions" / label_file.name
        with Image.open(pred_file) as p, Image.open(label_file) as t:
            pred, target = np.asarray(p).astype(np.int64), np.asarray(t).astype(np.int64)
        assert pred.shape == target.shape  # written at the original size
        assert pred.min() >= 1 and pred.max() <= 8  # ADE20K values: class + 1
        reduced = np.where(target == 0, 255, target - 1)
        metric.update(torch.from_numpy(pred - 1), torch.from_numpy(reduced))
    assert metric.compute()["mIoU"].item() == pytest.approx(logged, abs=1e-5)
    assert (run / "model.safetensors").is_file()
