"""Strata's command line: ``python train.py {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]``.

Built on LightningCLI. Adds ``--name`` (run name, default ``<task>-<backbone>-<timestamp>``) and ``--out_dir``
(default ``checkpoints``); every run lives in ``<out_dir>/<name>/`` (config.yaml, last.ckpt, best.ckpt, metrics.csv,
summary.json, model.safetensors, pretrained_cfg.json). Rerunning ``fit`` with the same name resumes from
``last.ckpt``; ``validate``/``test``/``predict`` with a name and no ``--ckpt_path`` use that run's ``best.ckpt``.
"""

from __future__ import annotations

import importlib
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.trainer import Trainer

from datamodules.errors import ConfigError, UserError
from tasks.checkpoint_loading import CheckedCheckpointIO, checkpoint_errors
from tasks.config_checks import check_model_fits_data
from tasks.csv_logging import AppendingCSVLogger
from tasks.fault_tolerance import Preemption, RandomStateCheckpoint
from tasks.run_artifacts import RunArtifacts
from tasks.run_loggers import point_loggers_at_run
from tasks.training_health import RunHealth
from tasks.visualization.callbacks import ValidationOverlays

DEMO_ROOT = Path("data/demo")
_RUN_NAME_ENV = "STRATA_RUN_NAME"


def default_run_name(task: str, backbone: str) -> str:
    """``<task>-<backbone>-<stamp>``, the same in every process of one distributed job.

    The stamp is the SLURM job id or torchrun's run id when launched by them; otherwise the launching process picks
    a timestamp and hands it to the processes Lightning spawns through the environment.
    """
    if os.environ.get(_RUN_NAME_ENV):
        return os.environ[_RUN_NAME_ENV]
    stamp = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if stamp == "none":
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{task}-{backbone}-{stamp}"


# demo layouts under DEMO_ROOT and the generator that writes each on first use
_DEMO_GENERATORS = {
    "imagenet": ("datamodules.shapes", "ensure_demo_data"),
    "coco": ("datamodules.shapes_coco", "ensure_demo_coco"),
    "ade20k": ("datamodules.shapes_ade20k", "ensure_demo_ade20k"),
}


class StrataCLI(LightningCLI):
    """LightningCLI with the run directory contract, auto-resume and the demo data generated on first use."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--name", type=str | None, default=None, help="Run name (default: <task>-<backbone>-<time>)"
        )
        parser.add_argument("--out_dir", type=str, default="checkpoints", help="Root folder of run directories.")
        parser.add_argument(
            "--save_every_n_steps",
            type=int,
            default=1000,
            help="Also write last.ckpt every N training steps, with the data loader's position (0: only per epoch).",
        )
        parser.add_argument(
            "--val_overlays",
            type=int,
            default=4,
            help="Draw this many validation images with predictions to <run>/visualizations each epoch (0: off).",
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # NOTE: LightningCLI reads --ckpt_path's hyperparameters here, before any hook; a bad file is named in one line
        subcommand = self.config.get("subcommand")
        with checkpoint_errors(self.config[subcommand].get("ckpt_path") if subcommand else None):
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        model_cfg = config.model
        task = model_cfg.class_path.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        name = config.name or default_run_name(task, model_cfg.init_args.get("backbone", "model"))
        os.environ[_RUN_NAME_ENV] = name
        self.run_name = name
        self.run_dir = Path(config.out_dir) / name
        if config.trainer.get("sync_batchnorm") and not torch.cuda.is_available():
            raise ConfigError(
                "trainer.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU path): drop it on CPU"
            )
        rank_zero = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
        point_loggers_at_run(config.trainer.get("logger"), self.run_dir, name, write_ids=rank_zero)
        data_root = Path(str(config.data.init_args.get("root", "")))
        if data_root.parent == DEMO_ROOT and data_root.name in _DEMO_GENERATORS:
            module, function = _DEMO_GENERATORS[data_root.name]
            getattr(importlib.import_module(module), function)(DEMO_ROOT)  # NOTE: a no-op once the data exist

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        check_model_fits_data(self.model, self.datamodule)  # NOTE: before any image is read
        trainer_cfg = dict(self._get(self.config_init, "trainer", default={}))
        loggers = trainer_cfg.get("logger")
        # NOTE: fit logs to <run>/metrics.csv; validate/test/predict to <run>/<subcommand>/ so they never clobber it
        version = "" if self.subcommand == "fit" else self.subcommand
        csv_class = AppendingCSVLogger if self.subcommand == "fit" else CSVLogger  # NOTE: a resumed fit keeps its rows
        csv_logger = csv_class(save_dir=str(self.run_dir.parent), name=self.run_name, version=version)
        if loggers is False:
            kwargs["logger"] = False
        elif loggers is None or loggers is True:
            kwargs["logger"] = csv_logger
        else:
            user = loggers if isinstance(loggers, list) else [loggers]
            kwargs["logger"] = [csv_logger, *(lg for lg in user if isinstance(lg, Logger))]
        kwargs["default_root_dir"] = str(self.run_dir)
        plugins = trainer_cfg.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        kwargs["plugins"] = [CheckedCheckpointIO(self.model), *plugins]
        model = self.model
        checkpoint = ModelCheckpoint(
            dirpath=self.run_dir,
            filename="best",
            monitor=getattr(model, "monitor", None),
            mode=getattr(model, "monitor_mode", "max"),
            save_last=True,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        callbacks = [
            checkpoint,
            RunHealth(),
            RunArtifacts(self.run_dir),
            Preemption(self.run_dir),
            RandomStateCheckpoint(),
        ]
        overlays = self.config[self.subcommand].get("val_overlays", 0)
        if overlays > 0 and self.subcommand in ("fit", "validate"):
            callbacks.append(ValidationOverlays(self.run_dir, num_images=overlays))
        every_n_steps = self.config[self.subcommand].get("save_every_n_steps", 0)
        if self.subcommand == "fit" and every_n_steps > 0:
            # NOTE: a mid-epoch last.ckpt; the datamodule's state in it holds the loader position
            callbacks.append(
                ModelCheckpoint(
                    dirpath=self.run_dir,
                    save_top_k=0,
                    save_last=True,
                    every_n_train_steps=every_n_steps,
                    enable_version_counter=False,
                )
            )
        writer = getattr(model, "prediction_writer", None)
        if self.subcommand == "predict" and writer is not None:
            callbacks.append(writer(self.run_dir))
        kwargs["callbacks"] = [*(trainer_cfg.get("callbacks") or []), *callbacks]
        config = {**trainer_cfg, **kwargs}
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer(config, extra)

    def _resolve_ckpt_path(self, default_file: str) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path"):
            return
        candidate = self.run_dir / default_file
        if candidate.is_file():
            print(f"Using {candidate}", flush=True)
            config["ckpt_path"] = str(candidate)

    def before_fit(self) -> None:
        self._resolve_ckpt_path("last.ckpt")

    def before_validate(self) -> None:
        self._resolve_ckpt_path("best.ckpt")

    def before_test(self) -> None:
        self._resolve_ckpt_path("best.ckpt")

    def before_predict(self) -> None:
        self._resolve_ckpt_path("best.ckpt")


def cli_main(args: list[str] | None = None, run: bool = True) -> StrataCLI:
    """Build and (by default) run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests use this)."""
    import backbones  # noqa: F401  (registers the project's models with timm)

    return StrataCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """Entry point: user errors (bad data, bad config) end with one line on stderr and exit code 2."""
    try:
        cli_main()
    except Exception as error:
        user_error = error if isinstance(error, UserError) else UserError.last
        if user_error is None or (user_error is not error and str(user_error) not in str(error)):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
