"""Two-process DDP (gloo, CPU) through the real command line: fit runs, and validation metrics equal one process's.

The validation sets have an odd number of images, so a padding distributed sampler would score one image twice
and shift the metric; the project's sampler must not.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.shapes import write_classification_dataset
from datamodules.shapes_ade20k import write_ade20k_dataset
from tests.support.cli import REPO, TINY_CLASSIFY, TINY_SEGMENT, run_train, train_args

CLASSIFY = [*TINY_CLASSIFY, "--data.init_args.batch_size", "8"]
SEGMENT = [*TINY_SEGMENT, "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2"]


def _run(subcommand: str, task_args: list[str], data: Path, out: Path, devices: int) -> subprocess.CompletedProcess:
    strategy = "ddp" if devices > 1 else "auto"
    extra = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
    result = run_train(train_args(subcommand, task_args, data, out, "ddp", *extra, "--trainer.strategy", strategy))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _validate_metric(run_dir: Path, column: str) -> float:
    with open(run_dir / "validate" / "metrics.csv") as f:
        values = [row[column] for row in csv.DictReader(f) if row.get(column)]
    assert len(values) == 1, values
    return float(values[0])


def _fit_then_validate_on_1_and_2_processes(task_args: list[str], data: Path, out: Path, metric: str) -> None:
    _run("fit", task_args, data, out, devices=2)
    run_dir = out / "ddp"
    assert (run_dir / "best.ckpt").is_file() and (run_dir / "summary.json").is_file()
    _run("validate", task_args, data, out, devices=1)
    single = _validate_metric(run_dir, metric)
    shutil.rmtree(run_dir / "validate")
    _run("validate", task_args, data, out, devices=2)
    assert _validate_metric(run_dir, metric) == single


def test_classification_ddp_fit_and_exact_validation(tmp_path: Path) -> None:
    data = write_classification_dataset(tmp_path / "data", num_train_per_class=4, num_val_per_class=2, image_size=32)
    first_val = sorted((data / "val").glob("*/*.*"))[0]
    first_val.unlink()  # 15 validation images: odd, so padding would count one twice
    _fit_then_validate_on_1_and_2_processes(CLASSIFY, data, tmp_path / "runs", "val/top1")


def test_segmentation_ddp_fit_and_exact_validation(tmp_path: Path) -> None:
    data = write_ade20k_dataset(tmp_path / "ade", num_train=4, num_val=5, image_size=64)
    _fit_then_validate_on_1_and_2_processes(SEGMENT, data, tmp_path / "runs", "val/mIoU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="SyncBatchNorm runs on CUDA devices")
def test_sync_batchnorm_without_cuda_is_a_one_line_error(tiny_imagenet: Path, tmp_path: Path) -> None:
    args = [sys.executable, "train.py", "fit", *CLASSIFY, "--data.init_args.root", str(tiny_imagenet)]
    args += ["--out_dir", str(tmp_path), "--trainer.sync_batchnorm", "true"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == [
        "error: trainer.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU path): drop it on CPU"
    ]
