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

__all__ = ["QUIET", "REPO", "TINY_CLASSIFY", "TINY_DETECT", "TINY_SEGMENT", "run_train", "train_args"]

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


def run_train(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess from the repository, output captured.

    ``env`` is the whole environment (default: this process's); one OpenMP thread and the repository on
    ``PYTHONPATH`` unless it says otherwise.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
