"""A run directory written before the run layer moved to ``runs/`` still resumes, validates and exports.

``tests/fixtures/pre_house_run`` is the ``last.ckpt`` (with ``config.yaml``, ``metrics.csv``, ``summary.json``) of a
one-epoch, 5-step fit of the tiny classification config (``test_efficientnet``, no EMA) made by the code at commit
c467df7, the last one before the move: its checkpoint holds that code's callback, datamodule and loop states.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import timm
import torch

from tests.support.cli import REPO, TINY_CLASSIFY, run_train, train_args

FIXTURE = REPO / "tests" / "fixtures" / "pre_house_run"
OLD_RUN = [
    "--model.init_args.backbone", "test_efficientnet",
    "--model.init_args.ema_decay", "null",
    "--data.init_args.batch_size", "8",
    "--trainer.limit_train_batches", "5",
    "--save_every_n_steps", "0",
    "--val_overlays", "0",
]  # fmt: skip


def test_a_run_from_before_the_move_resumes_validates_and_exports(tiny_imagenet: Path, tmp_path: Path) -> None:
    run = tmp_path / "prehouse"
    shutil.copytree(FIXTURE, run)
    old = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert old["global_step"] == 5 and old["epoch"] == 0

    resumed = run_train(
        train_args("fit", TINY_CLASSIFY, tiny_imagenet, tmp_path, "prehouse", *OLD_RUN, "--trainer.max_epochs", "2")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Using {run / 'last.ckpt'}" in resumed.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 10 and summary["epochs"] == 2  # continued from step 5, not restarted
    with open(run / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f) if row.get("val/top1")] == ["0", "1"]  # history kept

    assert not (FIXTURE / "model.safetensors").exists() and (run / "model.safetensors").exists()  # exported now
    model = timm.create_model(f"local-dir:{run}", pretrained=True)
    assert model.num_classes == 8 and sum(p.numel() for p in model.parameters()) > 0

    old_checkpoint = ("--ckpt_path", str(FIXTURE / "last.ckpt"))
    checked = run_train(
        train_args("validate", TINY_CLASSIFY, tiny_imagenet, tmp_path, "prehouse", *OLD_RUN, *old_checkpoint)
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
