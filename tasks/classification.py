"""Image classification: a timm backbone trained with the DeiT recipe (the one the BiFormer paper follows).

Recipe pieces and where they come from: AdamW with no weight decay on norms, biases and the model's
``no_weight_decay()`` set (timm ``create_optimizer_v2``); cosine schedule with linear warmup (timm
``CosineLRScheduler``), stepped every iteration or, as DeiT's and BiFormer's ``main.py`` step it, once per epoch
(``lr_interval``); label smoothing; mixup/cutmix with soft targets (timm ``Mixup`` and
``SoftTargetCrossEntropy``); an EMA of the weights (timm ``ModelEmaV3``), evaluated beside the raw weights and saved
in every checkpoint; top-1/top-5 from torchmetrics (synchronised across processes under DDP).

Learning-rate scaling rule (DeiT, arXiv 2012.12877; BiFormer ``main.py``): the configured ``lr`` is the rate for a
global batch of ``lr_base_size`` images, and the rate used is ``lr * global_batch / lr_base_size`` with
``global_batch = batch_size per device * devices * nodes * accumulate_grad_batches``. Set ``lr_base_size: null`` to
use ``lr`` as given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from core.errors import ConfigError
from datamodules.decode import ExcludedSamples
from visualization.overlays import render_classification, to_uint8_image

from .backbone import create_backbone
from .base import StrataTask
from .lr_schedules import optimizer_steps_per_epoch

__all__ = ["ClassificationTask"]


class ClassificationTask(StrataTask):
    """Train and evaluate a classifier built by ``timm.create_model``.

    Args:
        backbone: any timm-registered model name (the project's or timm's).
        num_classes: number of classes; linked from ``data.num_classes`` by ``train.py``.
        pretrained: start from the model's default pretrained weights.
        pretrained_file: start from the weights in this local file (``pretrained_cfg_overlay=dict(file=...)``).
        drop_path_rate: stochastic-depth rate passed to the model.
        backbone_kwargs: any other ``timm.create_model`` keyword arguments.
        optimizer: timm optimizer name (``adamw``, ``lamb``, ``sgd``, ...).
        lr: learning rate for a global batch of ``lr_base_size`` (see the module docstring).
        lr_base_size: reference global batch of ``lr``; ``None`` disables scaling.
        weight_decay: decoupled weight decay (not applied to norms, biases, ``no_weight_decay()``).
        layer_decay: layer-wise LR decay factor (needs the model's ``group_matcher``); ``None`` disables it.
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (may be fractional with ``lr_interval="step"``).
        warmup_lr: learning rate at the first step of warmup.
        min_lr: floor of the cosine schedule.
        lr_interval: ``"step"``: the schedule advances every optimizer update (warmup and cosine in updates);
            ``"epoch"``: DeiT's and BiFormer's ``main.py``: timm's scheduler in epochs, ``scheduler.step(epoch)``
            after each epoch, so epoch ``e`` trains at the schedule's value for ``e - 1`` (epochs 0 and 1 at
            ``warmup_lr``) and the rate is constant within an epoch.
        label_smoothing: label smoothing (folded into the mixup targets when mixup is on).
        mixup: mixup alpha (0 disables).
        cutmix: cutmix alpha (0 disables).
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        ema_decay: decay of the weight EMA; ``None`` disables the EMA.
        ema_warmup: ramp the EMA decay up over the first steps (timm's warmup), useful for short runs.
        monitor: metric that selects ``best.ckpt`` and the exported weights (``val/top1`` or ``val/ema_top1``).
        channels_last: run the model in channels-last memory format (faster convolutions on GPUs).
        compile: run the model through ``torch.compile``.
        max_nonfinite_steps: training steps with a non-finite loss that are skipped before the run stops
            (``tasks/nonfinite.py``).
        dataset_info: the data's class names and normalisation (linked from ``data.dataset_info``).
    """

    task_name = "classification"
    prediction_format = "classification"
    loss_per_epoch = True

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 1000,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        lr: float = 5e-4,
        lr_base_size: int | None = 512,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        lr_interval: str = "step",
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = 0.99996,
        ema_warmup: bool = False,
        monitor: str = "val/top1",
        channels_last: bool = False,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
        dataset_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(max_nonfinite_steps, dataset_info)
        self.save_hyperparameters(ignore=["dataset_info"])
        if monitor not in ("val/top1", "val/ema_top1", "val/top5", "val/ema_top5", "val/loss"):
            raise ConfigError(f"model.monitor {monitor!r} is not a logged metric: use val/top1 or val/ema_top1")
        if lr_interval not in ("step", "epoch"):
            raise ConfigError(f"model.lr_interval {lr_interval!r} is not supported: use step or epoch")
        if monitor.startswith("val/ema") and ema_decay is None:
            raise ConfigError(f"model.monitor {monitor!r} needs the EMA: set model.ema_decay (e.g. 0.9998)")
        kwargs = dict(backbone_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = create_backbone(
            backbone, pretrained=pretrained, pretrained_file=pretrained_file, num_classes=num_classes, **kwargs
        )
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup) if ema_decay is not None else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # NOTE: else DDP waits for gradients of the EMA copy that never come
        self.monitor = monitor
        self.monitor_mode = "min" if monitor.endswith("loss") else "max"

        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.soft_target_loss = SoftTargetCrossEntropy()

        def accuracy(top_k: int) -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")

        metrics = {"top1": accuracy(1)}
        if num_classes >= 5:
            metrics["top5"] = accuracy(5)
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.ema_metrics = self.val_metrics.clone(prefix="val/ema_") if self.ema is not None else None
        # NOTE: kept out of the module tree so checkpoints hold ``model.*`` keys only, compiled or not.
        self.__dict__["_forward"] = torch.compile(self.model) if compile else self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._forward(images)

    def training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict, int]:
        images, targets = batch
        if self.mixup_fn is not None:
            images, soft_targets = self.mixup_fn(images, targets)
            loss = self.soft_target_loss(self(images), soft_targets)
        else:
            loss = F.cross_entropy(self(images), targets, label_smoothing=self.hparams.label_smoothing)
        return loss, {}, images.shape[0]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # NOTE: one EMA update per optimizer step (also under gradient accumulation), before any checkpoint of the
        # step is written (callbacks save in on_train_batch_end), so a resumed run's EMA is exact
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor, ExcludedSamples], stage: str) -> None:
        images, targets = batch[0], batch[1]
        self.excluded_images.update(batch)
        if len(images) == 0:
            return  # NOTE: every image of the batch was excluded (data.eval_undecodable: exclude)
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), sync_dist=True, batch_size=images.shape[0])
        self.val_metrics.update(logits, targets)
        if self.ema is not None:
            if self.hparams.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            self.ema_metrics.update(self.ema.module(images), targets)

    def _log_metrics(self, stage: str) -> None:
        for collection in (self.val_metrics, self.ema_metrics):
            if collection is None:
                continue
            for name, value in collection.compute().items():
                self.log(name.replace("val/", f"{stage}/", 1), value, prog_bar=name.endswith("top1"), sync_dist=False)
            collection.reset()
        self.excluded_images.log_and_reset(self, stage)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(
        self, batch: tuple[torch.Tensor, torch.Tensor, ExcludedSamples], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        images = batch[0]
        if len(images) == 0:
            top_k = min(5, self.hparams.num_classes)
            return {"indices": torch.empty(0, top_k, dtype=torch.int64), "probs": torch.empty(0, top_k)}
        model = self.ema.module if self.ema is not None and self.monitor.startswith("val/ema") else self._forward
        probs = model(images).softmax(dim=-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        return {"indices": top.indices, "probs": top.values}

    def render_predictions(self, batch: tuple[torch.Tensor, ...], limit: int) -> list[Image.Image]:
        """One strip of the first ``limit`` images with their predicted and true class names."""
        images, targets = batch[0][:limit], batch[1][:limit]
        if limit <= 0 or len(images) == 0:
            return []
        mean, std = self.dataset_info.get("mean"), self.dataset_info.get("std")
        with torch.no_grad():
            probs = self(images).softmax(-1)
        tiles = [to_uint8_image(image, mean, std) for image in images]
        return [render_classification(tiles, probs, targets.tolist(), self.dataset_info.get("class_names"))]

    def global_batch_size(self) -> int:
        """Images per optimizer step across all processes (call after ``trainer.estimated_stepping_batches``, which
        builds the training loader)."""
        trainer = self.trainer
        return int(trainer.train_dataloader.batch_size) * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total_steps = int(self.trainer.estimated_stepping_batches)
        lr = hp.lr if hp.lr_base_size is None else hp.lr * self.global_batch_size() / hp.lr_base_size
        optimizer = create_optimizer_v2(
            self.model,
            opt=hp.optimizer,
            lr=lr,
            weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
            **({"betas": tuple(hp.betas)} if "adam" in hp.optimizer or "lamb" in hp.optimizer else {}),
        )
        if hp.lr_interval == "epoch":
            scheduler = CosineLRScheduler(
                optimizer,
                t_initial=int(self.trainer.max_epochs),
                lr_min=hp.min_lr,
                warmup_t=hp.warmup_epochs,
                warmup_lr_init=hp.warmup_lr,
                t_in_epochs=True,
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        steps_per_epoch = optimizer_steps_per_epoch(self.trainer)
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=total_steps,
            lr_min=hp.min_lr,
            warmup_t=round(hp.warmup_epochs * steps_per_epoch),
            warmup_lr_init=hp.warmup_lr,
            t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any) -> None:
        if self.hparams.lr_interval == "epoch":
            scheduler.step(epoch=self.current_epoch)  # NOTE: after epoch e, as main.py's lr_scheduler.step(epoch)
        else:
            super().lr_scheduler_step(scheduler, metric)

    def has_trained_weights(self) -> bool:
        """A classifier built from pretrained weights (default ones or a file) is trained as configured."""
        return bool(self.hparams.pretrained or self.hparams.pretrained_file)

    def export_module(self) -> nn.Module:
        """The weights the run exports: the EMA when it is the monitored model, else the trained model."""
        if self.ema is not None and self.monitor.startswith("val/ema"):
            return self.ema.module
        return self.model
