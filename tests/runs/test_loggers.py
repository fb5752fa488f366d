"""Loggers chosen in the config: wandb offline without credentials, one wandb run across a resume, no leaked keys."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runs.loggers import point_loggers_at_run
from tests.support.cli import TINY_CLASSIFY, run_train, train_args

SECRET = "0123456789abcdef-not-a-real-key-0123456789abcdef"

LOGGERS_YAML = """
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.WandbLogger
      init_args:
        project: strata-tests
    - class_path: lightning.pytorch.loggers.TensorBoardLogger
      init_args:
        save_dir: somewhere-else
"""


def _fit(data: Path, out: Path, config: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    task = [*TINY_CLASSIFY, "--config", str(config), "--data.init_args.batch_size", "16"]
    return run_train(train_args("fit", task, data, out, "logged", "--trainer.max_epochs", "2", *extra), env=env)


@pytest.mark.parametrize("key_in_env", [False, True])
def test_wandb_offline_logs_into_the_run_and_a_resume_reuses_the_run_id(
    tiny_imagenet: Path, tmp_path: Path, key_in_env: bool
) -> None:
    config = tmp_path / "loggers.yaml"
    config.write_text(LOGGERS_YAML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", HOME=str(tmp_path), WANDB_DIR=str(tmp_path / "wandb-elsewhere"))
    if key_in_env:
        env.update(WANDB_API_KEY=SECRET, WANDB_MODE="offline")  # a key, but no network: explicit offline mode
    stop_in_epoch_1 = ["--trainer.callbacks+=tests.support.fault_injection.KillAtStep", "--trainer.callbacks.step=6"]
    stop_in_epoch_1.append("--trainer.callbacks.signal_name=SIGTERM")
    first = _fit(tiny_imagenet, tmp_path / "runs", config, env, *stop_in_epoch_1)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "logged"
    run_id = (run / "wandb_run_id").read_text().strip()
    assert run_id
    second = _fit(tiny_imagenet, tmp_path / "runs", config, env)  # the same command after the stop: resumes
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run / "wandb_run_id").read_text().strip() == run_id
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
    assert all((p / f"run-{run_id}.wandb").stat().st_size > 0 for p in offline_runs)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "val/top1" in (run / "metrics.csv").read_text()
    if key_in_env:
        for path in run.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_point_loggers_leaves_other_loggers_and_flags_alone(tmp_path: Path) -> None:
    entries = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "x"}}]
    point_loggers_at_run(entries, tmp_path, "run", write_ids=True)
    assert entries == [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "x"}}]
    for flag in (None, True, False):
        point_loggers_at_run(flag, tmp_path, "run", write_ids=True)
    assert not (tmp_path / "wandb_run_id").exists()
