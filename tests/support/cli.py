"""The tests' way of running ``train.py``: tiny versions of the demo configs, in-process or in a subprocess.

``TINY_*`` shrink a demo config to a tiny generated dataset (small images and models, no loader workers);
``train_args`` puts a subcommand, a task, the data, the run directory and quiet trainer flags together, ``extra``
last so that it overrides; ``run_train`` runs them as ``python train.py ...`` from the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "QUIET",
    "REPO",
    "TINY_CLASSIFY",
    "TINY_DETECT",
    "TINY_SEGMENT",
    "main_error_line",
    "run_train",
    "start_train",
    "train_args",
    "train_env",
]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "demo"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_BACKBONE = ["--model.init_args.backbone_kwargs", "{n_win: 2, window_size: 2}"]

TINY_CLASSIFY = [
    "--config", str(CONFIGS / "classify.yaml"),
    "--data.init_args.img_size", "32",
    "--data.init_args.num_workers", "0",
    "--model.init_args.backbone", "test_resnet",
]  # fmt: skip
TINY_DETECT = [
    "--config", str(CONFIGS / "detect.yaml"),
    "--data.init_args.img_scale", "[64, 64]",
    "--data.init_args.batch_size", "4",
    "--data.init_args.num_workers", "0",
    *TINY_BACKBONE,
]  # fmt: skip
TINY_SEGMENT = [
    "--config", str(CONFIGS / "segment.yaml"),
    "--data.init_args.crop_size", "64",
    "--data.init_args.scale", "[128, 64]",
    "--data.init_args.eval_short_side", "64",
    "--data.init_args.batch_size", "4",
    "--data.init_args.num_workers", "0",
    "--model.init_args.pretrained_file", "null",
    "--model.init_args.head_channels", "16",
    *TINY_BACKBONE,
]  # fmt: skip


def train_args(subcommand: str, task: list[str], data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """``train.py`` arguments: ``subcommand``, the task's flags, the data root, run ``out/name``, quiet, ``extra``."""
    return [
        subcommand,
        *task,
        "--name", name,
        "--out_dir", str(out),
        "--data.init_args.root", str(data),
        *QUIET,
        *extra,
    ]  # fmt: skip


def train_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``train.py`` subprocess: ``env`` (default: this process's), one OpenMP thread and the
    repository on ``PYTHONPATH`` unless it says otherwise."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONPATH", str(REPO))
    return env


def run_train(
    args: list[str], env: dict[str, str] | None = None, timeout: int = 600, **popen: Any
) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess from the repository, output captured (``train_env(env)``);
    ``popen`` goes to ``subprocess.run`` (e.g. ``start_new_session=True``)."""
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=train_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def start_train(args: list[str], env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """``python train.py <args>`` started in the background, output captured (read it with ``communicate``)."""
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=train_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def main_error_line(argv: list[str], capsys: Any, monkeypatch: Any) -> str:
    """Run ``train.main()`` in process on ``argv``; it must exit 2 with exactly one stderr line, which is returned."""
    import pytest

    from train import main

    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    # NOTE: not "no Traceback at all": logging's own "--- Logging error ---" reports land here when a logger still
    # holds an earlier test's captured stream
    assert "usage:" not in err and "Does not validate" not in err and "DataLoader worker" not in errors[0], err[-3000:]
    return errors[0]
