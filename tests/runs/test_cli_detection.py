"""The detection command line end to end on a tiny shapes COCO dataset: fit, validate, predict, official scoring."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pytest
import timm
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.support.cli import REPO, TINY_DETECT, train_args
from train import cli_main

DETECT_CONFIG = str(REPO / "configs" / "demo" / "detect.yaml")


def _args(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(
        subcommand, TINY_DETECT, data, out, "det", "--model.init_args.detector_kwargs.box_score_thresh", "0.0", *extra
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_coco: Path) -> tuple[Path, Path]:
    data = tiny_coco
    out = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    cli_main(_args("fit", data, out, "--trainer.max_epochs", "1"))
    return data, out


def _val_metrics(run: Path) -> dict[str, float]:
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/bbox_AP")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_fit_logs_coco_metrics_and_exports_the_backbone(fitted: tuple[Path, Path]) -> None:
    _, out = fitted
    run = out / "det"
    for name in ("config.yaml", "last.ckpt", "best.ckpt", "metrics.csv", "summary.json", "model.safetensors"):
        assert (run / name).is_file(), name
    metrics = _val_metrics(run)
    assert {"val/bbox_AP", "val/bbox_AP50", "val/segm_AP", "val/segm_APl"} <= set(metrics)
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())
    backbone = timm.create_model(
        "strata_hybrid_pico",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(run / "model.safetensors")),
        num_classes=0,
        n_win=2,
        window_size=2,
    )
    state = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    stem = state["model.backbone.body.stem.conv1.weight"]
    assert torch.equal(backbone.stem.conv1.weight, stem)


def test_predict_json_scores_like_validation(fitted: tuple[Path, Path]) -> None:
    data, out = fitted
    cli_main(_args("predict", data, out))
    results = out / "det" / "predictions_coco.json"
    assert results.is_file()
    gt_file = data / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        predictions = gt.loadRes(str(results))
        evaluator = COCOeval(gt, predictions, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert set(predictions.getImgIds()) <= set(gt.getImgIds())
    assert {a["category_id"] for a in predictions.anns.values()} <= set(gt.getCatIds())
    assert evaluator.stats[0] == pytest.approx(_val_metrics(out / "det")["val/bbox_AP"], abs=1e-6)
