"""Strata's command line: ``python train.py {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]``.

A ``LightningCLI`` composed from its public hooks. It adds ``--name`` (run name, default
``<task>-<backbone>-<timestamp>``), ``--out_dir`` (default ``checkpoints``), ``--save_every_n_steps`` and
``--val_overlays``; links ``data.num_classes`` and ``data.dataset_info`` into the model; and gives every run its
directory ``<out_dir>/<name>/`` (``runs/run_directory.py``) with the run layer's callbacks, loggers and checkpoint
I/O. Rerunning ``fit`` with the same name resumes from ``last.ckpt``; ``validate``/``test``/``predict`` with a name
and no ``--ckpt_path`` use that run's ``best.ckpt``. User errors end with one line and exit code 2 (``main``).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.trainer import Trainer

from core.checkpoint_files import checkpoint_errors
from core.errors import ConfigError, UserError
from tasks.base import StrataTask

from .artifacts import RunArtifacts
from .best_checkpoint import BestCheckpointRecord
from .checkpoint_io import CheckedCheckpointIO
from .config_checks import check_model_fits_data
from .health import RunHealth
from .loggers import AppendingCSVLogger, point_loggers_at_run
from .overlays import ValidationOverlays
from .parse_errors import StrataArgumentParser
from .periodic_checkpoint import PeriodicLastCheckpoint
from .prediction_writers import prediction_writer_for
from .preemption import Preemption, StoppedBeforeTraining, report_stop_before_training, stop_before_training
from .process_rank import is_first_process
from .random_streams import RandomStateCheckpoint
from .resume_checks import ResumeSettings, check_resume_settings, trajectory_settings
from .run_directory import RUN_NAME_ENV, default_run_name, ensure_demo_data, remove_stale_temporary_files
from .run_lock import RunLock
from .strategies import EndChildRanksOnFailure, ddp_with_timeout
from .terminal import end_progress_bar_lines

__all__ = ["StrataCLI", "cli_main", "end_progress_bar_lines", "main"]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _task_class(class_path: str) -> type[StrataTask]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, StrataTask)):
        raise ConfigError(
            f"model.class_path {class_path!r} is not a Strata task: use tasks.classification.ClassificationTask, "
            "tasks.detection.DetectionTask, tasks.segmentation.SegmentationTask or a subclass of tasks.base.StrataTask"
        )
    return cls


def _no_checkpoint_message(run_dir: Path, default_file: str, subcommand: str) -> str:
    runs = sorted(p.parent.name for p in run_dir.parent.glob(f"*/{default_file}")) if run_dir.parent.is_dir() else []
    listed = f" (runs with one in {run_dir.parent}: {', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''})"
    return (
        f"{subcommand} would score untrained weights: run {run_dir} has no {default_file}{listed if runs else ''}; "
        "check --name, or pass --ckpt_path"
    )


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
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without a checkpoint even when the weights are untrained (pipeline checks).",
        )
        parser.add_argument(
            "--collective_timeout",
            type=float,
            default=10.0,
            help="Minutes a DDP collective may wait for the other ranks before the job fails (torch: 30).",
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.dataset_info", "model.init_args.dataset_info", apply_on="instantiate")

    def _subcommand(self, config: Any) -> Any:
        return config[self.subcommand] if self.subcommand else config

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # NOTE: LightningCLI reads --ckpt_path's hyperparameters right after parsing: name a bad file in one line first
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            with checkpoint_errors(ckpt_path):
                torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)

    def before_instantiate_classes(self) -> None:
        config: Namespace = self._subcommand(self.config)
        model_cfg = config.model
        task = _task_class(model_cfg.class_path).task_name
        name = config.name or default_run_name(task, model_cfg.init_args.get("backbone", "model"))
        os.environ[RUN_NAME_ENV] = name
        self.run_name = name
        self.run_dir = Path(config.out_dir) / name
        if config.trainer.get("sync_batchnorm") and not torch.cuda.is_available():
            raise ConfigError(
                "trainer.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU path): drop it on CPU"
            )
        first_process = is_first_process()
        if self.subcommand and first_process:
            self.run_lock = RunLock(self.run_dir, self.subcommand).acquire()
            if self.subcommand == "fit":
                remove_stale_temporary_files(self.run_dir)
        point_loggers_at_run(config.trainer.get("logger"), self.run_dir, name, write_ids=first_process)
        ensure_demo_data(Path(str(config.data.init_args.get("root", ""))))

    def _loggers(self, configured: Any) -> Any:
        # NOTE: fit logs to <run>/metrics.csv; validate/test/predict to <run>/<subcommand>/ so they never clobber it
        version = "" if self.subcommand == "fit" else self.subcommand
        csv_class = AppendingCSVLogger if self.subcommand == "fit" else CSVLogger  # NOTE: a resumed fit keeps its rows
        csv_logger = csv_class(save_dir=str(self.run_dir.parent), name=self.run_name, version=version)
        if configured is False:
            return False
        if configured is None or configured is True:
            return csv_logger
        user = configured if isinstance(configured, list) else [configured]
        return [csv_logger, *(logger for logger in user if isinstance(logger, Logger))]

    def _run_callbacks(self, model: StrataTask) -> list[Callback]:
        config = self._subcommand(self.config)
        callbacks: list[Callback] = [
            ModelCheckpoint(
                dirpath=self.run_dir,
                filename="best",
                monitor=model.monitor,
                mode=model.monitor_mode,
                save_last=True,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            ),
            RunHealth(),
            RunArtifacts(self.run_dir),
            Preemption(self.run_dir),
            EndChildRanksOnFailure(),
            RandomStateCheckpoint(),
        ]
        if config.get("val_overlays", 0) > 0 and self.subcommand in ("fit", "validate"):
            callbacks.append(ValidationOverlays(self.run_dir, num_images=config.val_overlays))
        every_n_steps = config.get("save_every_n_steps", 0)
        if self.subcommand == "fit" and every_n_steps > 0:
            # NOTE: a mid-epoch last.ckpt; the datamodule's state in it holds the loader position
            callbacks.append(PeriodicLastCheckpoint(str(self.run_dir), every_n_steps))
        if self.subcommand == "fit":
            callbacks += [ResumeSettings(config), BestCheckpointRecord(self.run_dir)]
        if self.subcommand == "predict":
            callbacks.append(prediction_writer_for(model, self.run_dir))
        return callbacks

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        check_model_fits_data(self.model, self.datamodule)  # NOTE: before any image is read
        trainer_cfg = self._subcommand(self.config_init)["trainer"]
        plugins, callbacks = (trainer_cfg.get(key) or [] for key in ("plugins", "callbacks"))
        strategy = ddp_with_timeout(trainer_cfg.get("strategy"), self._subcommand(self.config).collective_timeout)
        return super().instantiate_trainer(
            logger=self._loggers(trainer_cfg.get("logger")),
            strategy=strategy,
            default_root_dir=str(self.run_dir),
            plugins=[CheckedCheckpointIO(self.model), *_as_list(plugins)],
            callbacks=[*_as_list(callbacks), *self._run_callbacks(self.model)],
            **kwargs,
        )

    def _resolve_ckpt_path(self, default_file: str) -> None:
        config = self._subcommand(self.config_init)
        if config.get("ckpt_path"):
            return
        candidate = self.run_dir / default_file
        if candidate.is_file():
            print(f"Using {candidate}", flush=True)
            config["ckpt_path"] = str(candidate)
        elif self.subcommand != "fit" and not (self.model.has_trained_weights() or config.get("allow_untrained")):
            raise ConfigError(_no_checkpoint_message(self.run_dir, default_file, self.subcommand))

    def before_fit(self) -> None:
        self._resolve_ckpt_path("last.ckpt")
        ckpt_path = self._subcommand(self.config_init).get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            settings = trajectory_settings(self._subcommand(self.config), self.trainer.world_size)
            check_resume_settings(ckpt_path, settings, self.run_dir)

    def before_validate(self) -> None:
        self._resolve_ckpt_path("best.ckpt")

    def before_test(self) -> None:
        self._resolve_ckpt_path("best.ckpt")

    def before_predict(self) -> None:
        self._resolve_ckpt_path("best.ckpt")


def cli_main(args: list[str] | None = None, run: bool = True) -> StrataCLI:
    """Build and (by default) run the CLI; ``args`` replaces ``sys.argv[1:]`` (tests use this)."""
    import backbones  # noqa: F401  (registers the project's models with timm)

    try:
        return StrataCLI(
            parser_class=StrataArgumentParser,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    finally:
        RunLock.release_all()  # NOTE: a process that runs the CLI twice (tests, notebooks) must not hold its own lock


def main() -> None:
    """Entry point: user errors (bad data, bad config) end with one line on stderr and exit code 2; a stop signal
    before training ends with exit code 0 (``runs/preemption.py``)."""
    previous_handlers = stop_before_training()
    try:
        cli_main()
    except StoppedBeforeTraining as stop:
        end_progress_bar_lines()
        report_stop_before_training(stop)
        raise SystemExit(0) from None
    except Exception as error:
        user_error = error if isinstance(error, UserError) else UserError.last
        if user_error is None or (user_error is not error and str(user_error) not in str(error)):
            raise
        end_progress_bar_lines()
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
