"""The task contract: what the run layer (``runs/``) relies on in a task, and the code every task shares.

A task is a LightningModule that owns the research side of a run (model, loss, optimizer and schedule, metrics); the
run layer owns the engineering (checkpoints, export, loggers, health, prediction files) and reads a task only through
the attributes and methods declared here, never with ``getattr(task, ..., default)``:

- ``task_name`` names runs (``<task>-<backbone>-<stamp>``) and ``prediction_format`` picks the writer of
  ``predict``'s output (``runs/prediction_writers.py``);
- ``monitor`` / ``monitor_mode`` select ``best.ckpt``;
- ``export_module()`` is the ``nn.Module`` exported in timm's layout (``runs/export.py``), ``export_model_args()``
  the architecture arguments written with it;
- ``render_predictions(batch, limit)`` draws the predictions on the first images of an evaluation batch
  (``runs/overlays.py`` logs them); ``input_sizes()`` names the input sizes of the task's own inference, checked
  against the backbone's stride with the data's (``runs/config_checks.py``);
- ``has_trained_weights()`` says whether the task as configured holds weights worth evaluating without a checkpoint
  (``validate``/``test``/``predict`` refuse to score an untrained network: ``runs/cli.py``);
- ``nonfinite_guard`` and ``excluded_images`` are the counts ``summary.json`` reports;
- ``dataset_info`` is what the data told the task, linked from ``data.dataset_info`` by ``train.py`` the way
  ``num_classes`` is (class names, the normalisation of the images, COCO's category ids and annotation file).

Shared here, written once: the training step around ``training_loss`` (the non-finite-loss guard of
``tasks/nonfinite.py``, the loss and LR logging), dropping a skipped step's gradients, and stepping a timm scheduler
every optimizer update.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from PIL import Image
from torch import Tensor, nn

from core.errors import ConfigError

from .excluded_images import ExcludedImages
from .nonfinite import NonFiniteLossGuard

__all__ = ["PREDICTION_FORMATS", "StrataTask"]

PREDICTION_FORMATS = ("classification", "coco", "segmentation")
# NOTE: backbone arguments that do not change the exported architecture, or name files of this machine
TRAINING_ONLY_BACKBONE_KWARGS = ("drop_path_rate", "pretrained_cfg_overlay", "features_only", "out_indices")


class StrataTask(L.LightningModule):
    """Base of the project's LightningModules: the contract of the module docstring and the shared training step.

    Subclasses set ``task_name`` and ``prediction_format``, set ``self.monitor`` (and ``monitor_mode`` when it is
    not ``"max"``) in ``__init__``, and implement ``training_loss``, ``export_module`` and ``render_predictions``.

    Args:
        max_nonfinite_steps: training steps with a non-finite loss that are skipped before the run stops.
        dataset_info: what the datamodule tells the task (``datamodule.dataset_info``, linked by ``train.py``).
    """

    task_name: ClassVar[str]
    prediction_format: ClassVar[str]
    # NOTE: log train/loss averaged over each epoch too (train/loss_epoch in metrics.csv)
    loss_per_epoch: ClassVar[bool] = False

    def __init__(self, max_nonfinite_steps: int = 10, dataset_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.nonfinite_guard = NonFiniteLossGuard(max_nonfinite_steps)
        self.excluded_images = ExcludedImages()
        self.dataset_info: dict[str, Any] = dict(dataset_info or {})
        self.monitor: str = ""
        self.monitor_mode: str = "max"

    def data_field(self, key: str) -> Any:
        """``dataset_info[key]``, or a one-line error saying which datamodule the task needs."""
        if key not in self.dataset_info:
            raise ConfigError(
                f"{type(self).__name__} needs the data's {key!r} (dataset_info): build it with train.py, or pass "
                "dataset_info=datamodule.dataset_info"
            )
        return self.dataset_info[key]

    # ----- what each task implements -----
    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor], int]:
        """``(loss, {name: logged part}, batch size)`` of a training batch."""
        raise NotImplementedError

    def export_module(self) -> nn.Module:
        """The trained network exported in timm's layout."""
        raise NotImplementedError

    def export_model_args(self) -> dict[str, Any]:
        """The architecture arguments of ``export_module()``, written as timm's ``model_args`` into ``config.json`` so
        that ``timm.create_model("local-dir:RUN")`` rebuilds it: the task's ``backbone_kwargs`` without the ones that
        only shape training."""
        kwargs = dict(self.hparams.get("backbone_kwargs") or {})
        for key in TRAINING_ONLY_BACKBONE_KWARGS:
            kwargs.pop(key, None)
        return kwargs

    def render_predictions(self, batch: Any, limit: int) -> list[Image.Image]:
        """Pictures of the predictions on the first ``limit`` images of an evaluation batch (no gradients)."""
        raise NotImplementedError

    def input_sizes(self) -> dict[str, int]:
        """``{argument: image side}`` of the inputs the task's own inference makes (e.g. sliding-window crops)."""
        return {}

    def has_trained_weights(self) -> bool:
        """Whether the configured weights (without a checkpoint) are a trained network; a head built here is not."""
        return False

    # ----- shared -----
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.nonfinite_guard.before_forward(self)
        loss, parts, batch_size = self.training_loss(batch)
        loss = self.nonfinite_guard(self, loss)
        if self.nonfinite_guard.skipping:
            return loss  # NOTE: a zero-gradient stand-in: every process drops this step (tasks/nonfinite.py)
        if parts:
            self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=self.loss_per_epoch, prog_bar=True, batch_size=batch_size)
        lr = self.optimizers().param_groups[0]["lr"]
        self.log("train/lr", lr, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.nonfinite_guard.drop_skipped_step(self)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)
