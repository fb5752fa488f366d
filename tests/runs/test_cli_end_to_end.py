"""The real command line end to end on a tiny generated dataset, and its one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import yaml

from tests.support.cli import TINY_CLASSIFY, run_train, train_args
from train import cli_main


def _args(subcommand: str, data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(subcommand, TINY_CLASSIFY, data, out, "e2e", "--data.init_args.batch_size", "16", *extra)


@pytest.fixture(scope="module")
def fitted_run(tiny_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cli_main(_args("fit", tiny_imagenet, out, "--trainer.max_epochs", "2"))
    return out / "e2e"


def test_fit_writes_the_run_directory(fitted_run: Path) -> None:
    for name in ("config.yaml", "last.ckpt", "best.ckpt", "metrics.csv", "summary.json", "model.safetensors"):
        assert (fitted_run / name).is_file(), name
    summary = json.loads((fitted_run / "summary.json").read_text())
    assert summary["monitor"] == "val/top1" and summary["epochs"] == 2
    assert summary["global_step"] == 2 * (64 // 16)
    assert 0.0 <= summary["best_metric"] <= 1.0
    assert summary["train_images_per_sec"] > 0
    cfg = json.loads((fitted_run / "pretrained_cfg.json").read_text())
    assert cfg["num_classes"] == 8 and cfg["input_size"] == [3, 32, 32] and len(cfg["label_names"]) == 8
    with open(fitted_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for row in rows if row.get("val/top1")) == 2  # one row per validation
    config = yaml.safe_load((fitted_run / "config.yaml").read_text())
    assert config["model"]["init_args"]["backbone"] == "test_resnet"
    hparams = torch.load(fitted_run / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 8  # linked from data.num_classes


def test_checkpoints_load_weights_only(fitted_run: Path) -> None:
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(fitted_run / name, map_location="cpu", weights_only=True)
        assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
        assert ckpt["lr_schedulers"] and ckpt["optimizer_states"]


def test_validate_from_checkpoint_reproduces_best_metric(fitted_run: Path, tiny_imagenet: Path) -> None:
    cli = cli_main(_args("validate", tiny_imagenet, fitted_run.parent))
    summary = json.loads((fitted_run / "summary.json").read_text())
    assert cli.trainer.callback_metrics["val/top1"].item() == pytest.approx(summary["best_metric"], abs=1e-6)


def test_predict_writes_one_row_per_image(fitted_run: Path, tiny_imagenet: Path) -> None:
    cli_main(_args("predict", tiny_imagenet, fitted_run.parent))
    with open(fitted_run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 * 4
    assert all(Path(row["path"]).is_file() and row["top1_name"] for row in rows)
    accuracy = sum(int(row["label"]) == int(row["top1"]) for row in rows) / len(rows)
    summary = json.loads((fitted_run / "summary.json").read_text())
    assert accuracy == pytest.approx(summary["best_metric"], abs=1e-6)  # same weights as best.ckpt's validation


def _checkpoint_model(run: Path) -> torch.nn.Module:
    state = torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model = timm.create_model("test_resnet", num_classes=8)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval()


def test_safetensors_round_trip_through_timm(fitted_run: Path) -> None:
    reference = _checkpoint_model(fitted_run)
    file = str(fitted_run / "model.safetensors")
    by_file = timm.create_model(
        "test_resnet", pretrained=True, num_classes=8, pretrained_cfg_overlay=dict(file=file, num_classes=8)
    ).eval()
    by_dir = timm.create_model(f"local-dir:{fitted_run}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        for model in (by_file, by_dir):
            assert (model(x) - expected).abs().max().item() <= 1e-5


def test_a_rerun_of_a_finished_fit_resumes_at_its_end(fitted_run: Path, tiny_imagenet: Path, tmp_path: Path) -> None:
    run = shutil.copytree(fitted_run, tmp_path / "e2e")
    cli = cli_main(_args("fit", tiny_imagenet, tmp_path, "--trainer.max_epochs", "2"))
    assert cli.trainer.global_step == 2 * 4  # resumed at its end (restarted, it would validate epochs 0 and 1 again)
    with open(run / "metrics.csv") as f:
        validated_epochs = [int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/top1")]
    assert validated_epochs == [0, 1]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_train(list(args), env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    import re

    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_is_one_line(tiny_imagenet: Path, tmp_path: Path, missing: str) -> None:
    root = shutil.copytree(tiny_imagenet, tmp_path / "ds")
    shutil.rmtree(root / missing)
    result = _run_cli(*_args("fit", root, tmp_path / "out"))
    _assert_one_line_error(result, rf"missing folder .*ds/{missing}")


def test_empty_class_folder_is_one_line(tiny_imagenet: Path, tmp_path: Path) -> None:
    root = shutil.copytree(tiny_imagenet, tmp_path / "ds")
    for f in (root / "train" / "ring").iterdir():
        f.unlink()
    result = _run_cli(*_args("fit", root, tmp_path / "out"))
    _assert_one_line_error(result, r"empty class folder .*ds/train/ring")


def test_unknown_backbone_is_one_line(tiny_imagenet: Path, tmp_path: Path) -> None:
    result = _run_cli(*_args("fit", tiny_imagenet, tmp_path / "out"), "--model.init_args.backbone", "resnet_18")
    _assert_one_line_error(result, r"unknown backbone 'resnet_18'.*resnet18")
