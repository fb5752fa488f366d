"""A resumed fit trains on the trajectory it was started with, or refuses in one line.

Resuming restores the optimizer, the LR schedule (built for the old epoch count and batch size), the loader position
(counted in the old batches and ranks) and the random streams. A changed batch size or rank count would skip the
wrong number of samples, a changed LR would be overwritten by the restored schedule, more epochs would run at the
old schedule's ``min_lr``, and ``config.yaml`` would then show only the new settings. Applying such changes
consistently would mean a new trajectory, which is a new run; so ``fit`` compares the settings that shape the
trajectory with those stored in the checkpoint and stops at the first difference with one line naming the field,
its old and new value, and how to go on.

Settings that do not change what is trained may change on resume: where the data lives (``data.root``), loader
workers, memory pinning, evaluation batch size and bad-input policies, the model's ``monitor``, ``channels_last``
and ``compile``, the loggers and callbacks, and everything outside ``TRAINER_TRAJECTORY``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L

from core.checkpoint_files import load_checkpoint_file
from core.errors import ConfigError

__all__ = ["TRAJECTORY_KEY", "ResumeSettings", "check_resume_settings", "trajectory_settings"]

TRAJECTORY_KEY = "strata_trajectory"
TRAINER_TRAJECTORY = (
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
    "overfit_batches",
)
FREE_MODEL_ARGS = frozenset(
    {"monitor", "channels_last", "compile", "max_nonfinite_steps", "pretrained", "pretrained_file"}
)
FREE_DATA_ARGS = frozenset(
    {
        "root",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "eval_batch_size",
        "eval_undecodable",
        "max_skipped_fraction",
        "max_image_pixels",
        "class_names_file",
    }
)


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def trajectory_settings(config: Any, world_size: int) -> dict[str, Any]:
    """The settings of a fit ``config`` (the parsed subcommand namespace) that shape its training trajectory, as
    ``{"data.init_args.batch_size": 64, ...}`` with plain values, plus the rank count as ``world_size``."""
    settings: dict[str, Any] = {"world_size": int(world_size), "seed_everything": _plain(config.get("seed_everything"))}
    for section, free in (("model", FREE_MODEL_ARGS), ("data", FREE_DATA_ARGS)):
        part = config.get(section)
        settings[f"{section}.class_path"] = _plain(part.get("class_path"))
        for key, value in sorted(_plain(part.get("init_args") or {}).items()):
            if key not in free:
                settings[f"{section}.init_args.{key}"] = value
    for key in TRAINER_TRAJECTORY:
        settings[f"trainer.{key}"] = _plain(config.trainer.get(key))
    for key in ("optimizer", "lr_scheduler"):
        settings[key] = _plain(config.get(key))
    return settings


def check_resume_settings(checkpoint_path: str | Path, settings: dict[str, Any], run_dir: Path) -> None:
    """Raise a one-line ``ConfigError`` when ``settings`` differ from those stored in the checkpoint being resumed
    (checkpoints written before the settings were stored are resumed unchecked)."""
    stored = load_checkpoint_file(checkpoint_path, mmap=True).get(TRAJECTORY_KEY)
    if not isinstance(stored, dict):
        return
    for key in sorted(stored.keys() | settings.keys()):
        old, new = stored.get(key), settings.get(key)
        if old != new:
            option = "the number of ranks (--trainer.devices x --trainer.num_nodes)" if key == "world_size" else key
            raise ConfigError(
                f"run {run_dir} was trained with {option}={old!r}, this command gives {new!r}: resuming would not "
                f"continue that training (loader position, LR schedule and batches follow the old value); keep "
                f"{old!r} to resume, or start a new run with another --name"
            )


class ResumeSettings(L.Callback):
    """Stores the trajectory settings of the fit ``config`` (``trajectory_settings``) in every checkpoint, for
    ``check_resume_settings``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.settings: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.settings = trajectory_settings(self.config, trainer.world_size)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAJECTORY_KEY] = self.settings
