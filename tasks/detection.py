"""Object detection and instance segmentation: torchvision RetinaNet / Mask R-CNN on any timm backbone.

The recipe is the one the BiFormer and DaViT papers used through mmdetection 2.x (BiFormer ``object_detection/configs``,
field by field in ``configs/coco/*.yaml``): AdamW (lr 1e-4; weight decay 0.05 for Mask R-CNN with none on parameters
whose name matches ``no_weight_decay``, 1e-4 on every parameter for RetinaNet: ``tasks/param_groups.py``), mmcv's
linear warmup over 500 iterations from 0.001 x lr, then x0.1 at epochs 8 and 11 of 12 counted from the start (the 1x
schedule; 3x = 36 epochs, steps at 27 and 33), stepped every iteration (``tasks/lr_schedules.py``); gradient clipping
and mixed precision come from the Trainer. The backbone gets a LayerNorm per output level and BatchNorm statistics
fixed in training (``norm_eval``), as BiFormer's detection backbone has.

Validation runs the official COCO evaluator on the dataset's annotation file (``tasks/coco_evaluation.py``), with
every image evaluated once across DDP ranks; ``predict`` writes a COCO results JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from PIL import Image
from torch import Tensor, nn

from core.errors import ConfigError
from datamodules.decode import excluded_samples
from visualization.overlays import render_detection, to_uint8_image

from .backbone import backbone_from_features
from .base import StrataTask
from .coco_evaluation import CocoEvaluator, detections_to_coco
from .heads.detectors import DETECTORS, build_detector
from .lr_schedules import MMCVLrSchedule, optimizer_steps_per_epoch
from .param_groups import create_adamw

__all__ = ["DetectionTask"]

Batch = tuple[list[Tensor], list[dict[str, Any]]]
_TARGET_KEYS = ("boxes", "labels", "masks")


class DetectionTask(StrataTask):
    """Train and evaluate a torchvision detector whose backbone is ``timm.create_model(backbone, features_only=True)``.

    Args:
        backbone: any timm-registered model name (the project's or timm's).
        num_classes: foreground classes; linked from ``data.num_classes`` by ``train.py``.
        detector: ``"retinanet"`` or ``"maskrcnn"`` (boxes and instance masks).
        pretrained: start the backbone from its default pretrained weights.
        pretrained_file: start the backbone from this local file (a classification run's ``model.safetensors``,
            an official checkpoint the model's filter converts, ...).
        drop_path_rate: backbone stochastic depth.
        backbone_kwargs: other ``timm.create_model`` kwargs (``n_win``, ``window_size``, ...).
        out_indices: backbone levels for the FPN; None: 1-3 for RetinaNet, 0-3 for Mask R-CNN.
        fpn_channels: FPN width (256 in the papers).
        level_norm: LayerNorm on every backbone output level.
        norm_eval: BatchNorm layers of the backbone in eval mode while training: running statistics fixed, affine
            parameters trained (mmdet ``norm_eval=True``, BiFormer's ``BiFormer_mm`` default).
        freeze_bn: frozen BatchNorm in the backbone: statistics and affine parameters fixed (torchvision's
            ``FrozenBatchNorm2d``; stricter than ``norm_eval``).
        frozen_stages: backbone levels kept frozen (-1: none).
        detector_kwargs: torchvision detector kwargs over mmdet's defaults (``tasks/heads/detectors.py``
            ``MMDET_DEFAULTS``; ``min_size`` is ignored: the datamodule resizes).
        roi_head_width: Mask R-CNN head width (None: the papers' 256-channel mask convs and 1024-d box MLP).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        no_weight_decay: parameter-name patterns exempt from weight decay (mmcv's ``custom_keys`` with
            ``decay_mult=0``, regular expressions searched in the name; ``[]``: decay everything); None: timm's rule
            (no decay on norms, biases and ``no_weight_decay()``).
        betas: AdamW betas.
        warmup_iters: linear warmup length in iterations.
        warmup_ratio: warmup starts at ``warmup_ratio * lr`` (mmcv's linear warmup).
        lr_steps: epochs, counted from the start of training, after which the learning rate is multiplied by
            ``lr_decay`` (mmdet ``policy='step'``).
        lr_decay: step decay factor.
        monitor: metric that selects ``best.ckpt`` (``val/bbox_AP`` or ``val/segm_AP``).
        max_nonfinite_steps: training steps with a non-finite loss that are skipped before the run stops
            (``tasks/nonfinite.py``).
        dataset_info: the data's category ids, val annotation file and class names (linked from
            ``data.dataset_info``).
    """

    task_name = "detection"
    prediction_format = "coco"

    def __init__(
        self,
        backbone: str = "biformer_small",
        num_classes: int = 80,
        detector: str = "maskrcnn",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        out_indices: Sequence[int] | None = None,
        fpn_channels: int = 256,
        level_norm: bool = True,
        norm_eval: bool = False,
        freeze_bn: bool = False,
        frozen_stages: int = -1,
        detector_kwargs: dict[str, Any] | None = None,
        roi_head_width: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        no_weight_decay: list[str] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 500,
        warmup_ratio: float = 0.001,
        lr_steps: Sequence[int] = (8, 11),
        lr_decay: float = 0.1,
        monitor: str = "val/bbox_AP",
        max_nonfinite_steps: int = 10,
        dataset_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(max_nonfinite_steps, dataset_info)
        self.save_hyperparameters(ignore=["dataset_info"])
        if detector not in DETECTORS:
            raise ConfigError(f"model.detector {detector!r} is not supported: use one of {', '.join(DETECTORS)}")
        if monitor not in ("val/bbox_AP", "val/segm_AP") or (monitor == "val/segm_AP" and detector != "maskrcnn"):
            raise ConfigError(f"model.monitor {monitor!r} is not logged: use val/bbox_AP (or val/segm_AP for maskrcnn)")
        kwargs = dict(backbone_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        cfg = timm.get_pretrained_cfg(backbone)
        mean = cfg.mean if cfg is not None else timm.data.IMAGENET_DEFAULT_MEAN
        std = cfg.std if cfg is not None else timm.data.IMAGENET_DEFAULT_STD
        self.model = build_detector(
            detector,
            backbone,
            num_classes,
            image_mean=mean,
            image_std=std,
            out_indices=out_indices,
            fpn_channels=fpn_channels,
            level_norm=level_norm,
            norm_eval=norm_eval,
            freeze_bn=freeze_bn,
            frozen_stages=frozen_stages,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            backbone_kwargs=kwargs,
            detector_kwargs=detector_kwargs,
            roi_head_width=roi_head_width,
        )
        self.iou_types = ("bbox", "segm") if detector == "maskrcnn" else ("bbox",)
        self.monitor = monitor
        self.evaluator: CocoEvaluator | None = None

    def forward(self, images: list[Tensor], output_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict]:
        """Detections per image; boxes/masks at ``output_sizes`` (the original image sizes) when given."""
        if output_sizes is None:
            return self.model(images)
        with self.model.transform.output_sizes(output_sizes):
            return self.model(images)

    def training_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], int]:
        images, targets = batch
        losses = self.model(images, [{k: t[k] for k in _TARGET_KEYS if k in t} for t in targets])
        return sum(losses.values()), losses, len(images)

    # ----- evaluation -----
    def _category_ids(self) -> list[int]:
        return list(self.data_field("category_ids"))

    def _coco_records(self, batch: Batch) -> tuple[list[dict], list[int]]:
        images, targets = batch[0], batch[1]
        if not images:
            return [], []  # NOTE: every image of the batch was excluded (data.eval_undecodable: exclude)
        detections = self(images, output_sizes=[tuple(t["orig_size"]) for t in targets])
        ids = self._category_ids()
        records = [r for d, t in zip(detections, targets) for r in detections_to_coco(d, int(t["image_id"]), ids)]
        return records, [int(t["image_id"]) for t in targets]

    def on_validation_epoch_start(self) -> None:
        annotation_file = self.data_field("val_annotation_file")
        if self.evaluator is None or self.evaluator.annotation_file != annotation_file:
            self.evaluator = CocoEvaluator(annotation_file, self.iou_types)
        self.evaluator.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.excluded_images.update(batch)
        self.evaluator.update(*self._coco_records(batch), [int(e.key) for e in excluded_samples(batch)])

    def on_validation_epoch_end(self) -> None:
        self.evaluator.gather()
        stats = self.evaluator.compute()  # the same on every rank after the gather
        for name, value in stats.items():
            self.log(f"val/{name}", value, prog_bar=name in ("bbox_AP", "segm_AP"), sync_dist=False)
        self.excluded_images.log_and_reset(self, "val")

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.evaluator.gather()
        for name, value in self.evaluator.compute().items():
            self.log(f"test/{name}", value, sync_dist=False)
        self.excluded_images.log_and_reset(self, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        records, image_ids = self._coco_records(batch)
        return {"records": records, "image_ids": image_ids}

    def render_predictions(self, batch: Batch, limit: int) -> list[Image.Image]:
        """Prediction | ground truth, boxes and masks, for each of the first ``limit`` images."""
        images, targets = list(batch[0][:limit]), list(batch[1][:limit])
        if limit <= 0 or not images:
            return []
        with torch.no_grad():
            detections = self(images)
        names = self.dataset_info.get("class_names")
        return [
            render_detection(to_uint8_image(image), det, target, names)
            for image, det, target in zip(images, detections, targets)
        ]

    # ----- optimisation -----
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_adamw(
            self.model,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            no_weight_decay=hp.no_weight_decay,
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = MMCVLrSchedule(
            optimizer,
            "step",
            total_steps,
            warmup_iters=hp.warmup_iters,
            warmup_ratio=hp.warmup_ratio,
            milestones=hp.lr_steps,
            gamma=hp.lr_decay,
            steps_per_epoch=optimizer_steps_per_epoch(self.trainer),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_module(self) -> nn.Module:
        """The trained backbone as a full timm model (no classifier), so ``timm.create_model`` can load it."""
        hp = self.hparams
        return backbone_from_features(hp.backbone, self.model.backbone.body, **(hp.backbone_kwargs or {}))
