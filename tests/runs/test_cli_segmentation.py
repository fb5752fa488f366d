"""The segmentation command line end to end on a tiny shapes ADE20K dataset: fit, then predict PNG label maps."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.segmentation_metrics import SegmentationMetrics
from tests.support.cli import REPO, TINY_SEGMENT, train_args
from train import cli_main

SEGMENT_CONFIG = str(REPO / "configs" / "demo" / "segment.yaml")


def _args(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(subcommand, TINY_SEGMENT, data, out, "seg", *extra)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_ade20k: Path) -> tuple[Path, Path]:
    data = tiny_ade20k
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
