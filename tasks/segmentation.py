"""Semantic segmentation: UperNet or Semantic FPN on any timm backbone, the BiFormer paper's ADE20K recipes.

Recipes (BiFormer ``semantic_segmentation/configs/ade20k``, mmsegmentation 0.x; field by field in
``configs/ade20k/*.yaml``): UperNet 160k - AdamW lr 6e-5, weight decay 0.01 except on parameters whose name matches
``norm``, poly decay (power 1, floor 0) with mmcv's linear warmup over 1500 iterations from 1e-6 x lr, auxiliary FCN
head on stage 3 with loss weight 0.4; Semantic FPN 80k - AdamW lr 2e-4, weight decay 1e-4 on every parameter, cosine
annealing to 1e-8 x lr with linear warmup over 1000 iterations from 0.1 x lr. Both step every iteration
(``tasks/lr_schedules.py``); mixed precision comes from the Trainer.

Evaluation resizes the logits to each image's original size and accumulates one confusion matrix over the whole
validation set (``tasks/segmentation_metrics.py``): mIoU, mAcc, aAcc as the benchmark computes them, exact under DDP.
Inference is whole-image or sliding-window (crop 512, stride 341 in the papers), with optional flip and scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from core.errors import ConfigError
from visualization.overlays import render_segmentation, to_uint8_image

from .backbone import backbone_from_features, create_backbone
from .base import StrataTask
from .heads.segmentation_heads import FCNHead, SemanticFPNHead, UperNetHead
from .lr_schedules import MMCVLrSchedule
from .param_groups import create_adamw
from .segmentation_metrics import SegmentationMetrics

__all__ = ["SegmentationTask", "slide_inference"]

_HEADS = ("upernet", "semfpn")


def slide_inference(model: nn.Module, images: Tensor, num_classes: int, crop_size: int, stride: int) -> Tensor:
    """Logits of ``model`` over overlapping ``crop_size`` windows, averaged where they overlap (mmseg ``slide``).

    Windows start every ``stride`` pixels and the last one is flush with the border; an image smaller than the crop
    is one window of its own size. ``model(crop)`` must return logits at the crop's size.
    """
    batch, _, height, width = images.shape
    rows = max(-(-(height - crop_size) // stride), 0) + 1
    cols = max(-(-(width - crop_size) // stride), 0) + 1
    logits = images.new_zeros(batch, num_classes, height, width)
    counts = images.new_zeros(1, 1, height, width)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, max(height - crop_size, 0)), min(c * stride, max(width - crop_size, 0))
            y2, x2 = min(y1 + crop_size, height), min(x1 + crop_size, width)
            logits[:, :, y1:y2, x1:x2] += model(images[:, :, y1:y2, x1:x2])
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


class SegmentationNet(nn.Module):
    """``timm`` features (``features_only``) -> a LayerNorm per level -> decode head (+ auxiliary FCN head)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        head: str,
        head_channels: int | None,
        aux_head: bool,
        level_norm: bool,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(
            backbone,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            **backbone_kwargs,
        )
        channels = self.backbone.feature_info.channels()
        self.level_norms = nn.ModuleList(LayerNorm2d(c) if level_norm else nn.Identity() for c in channels)
        if head == "upernet":
            self.decode_head = UperNetHead(channels, num_classes, channels=head_channels or 512)
        else:
            width = head_channels or 128  # NOTE: the FPN is twice the branch width (256 / 128 in the paper)
            self.decode_head = SemanticFPNHead(channels, num_classes, fpn_channels=2 * width, channels=width)
        self.aux_head = FCNHead(channels[2], num_classes, channels=(head_channels or 512) // 2) if aux_head else None

    def forward(self, images: Tensor, with_aux: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        feats = [norm(f) for norm, f in zip(self.level_norms, self.backbone(images))]
        logits = F.interpolate(self.decode_head(feats), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if not with_aux:
            return logits
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(feats[2]), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux


class SegmentationTask(StrataTask):
    """Train and evaluate a semantic segmenter on ``timm.create_model(backbone, features_only=True)``.

    Args:
        backbone: any timm-registered model name.
        num_classes: classes (150 for ADE20K); linked from ``data.num_classes`` by ``train.py``.
        head: ``"upernet"`` or ``"semfpn"``.
        pretrained: start the backbone from its default pretrained weights.
        pretrained_file: start the backbone from this local file.
        drop_path_rate: backbone stochastic depth.
        backbone_kwargs: other ``timm.create_model`` kwargs (``n_win``, ...).
        head_channels: decode head width (None: UperNet 512, Semantic FPN 128 with a 256-channel FPN).
        aux_head: auxiliary FCN head on stage 3; None: on for UperNet (its recipe), off for Semantic FPN.
        aux_weight: its loss weight.
        level_norm: LayerNorm on every backbone level.
        ignore_index: label ignored by the loss and the metrics.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        no_weight_decay: parameter-name patterns exempt from weight decay (mmcv's ``custom_keys`` with
            ``decay_mult=0``, regular expressions searched in the name; ``[]``: decay everything); None: timm's rule
            (no decay on norms, biases and ``no_weight_decay()``).
        betas: AdamW betas.
        schedule: ``"poly"`` (power ``poly_power``) or ``"cosine"`` (mmcv ``CosineAnnealing``), with mmcv's linear
            warmup; stepped per iteration (``tasks/lr_schedules.py``).
        poly_power: exponent of the poly decay.
        warmup_iters: warmup length in iterations.
        warmup_ratio: warmup starts at ``warmup_ratio`` times the scheduled rate.
        min_lr: final learning rate.
        min_lr_ratio: cosine only: final learning rate as a fraction of ``lr`` (overrides ``min_lr``; mmcv's
            ``min_lr_ratio``).
        inference: ``"whole"`` or ``"slide"``.
        slide_crop: sliding-window crop size.
        slide_stride: sliding-window stride.
        flip: also predict on the flipped image and average (test-time augmentation).
        scales: extra test scales (e.g. ``[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]``), logits averaged; None for single scale.
        max_nonfinite_steps: training steps with a non-finite loss that are skipped before the run stops
            (``tasks/nonfinite.py``).
        dataset_info: the data's class names and normalisation (linked from ``data.dataset_info``).
    """

    task_name = "segmentation"
    prediction_format = "segmentation"

    def __init__(
        self,
        backbone: str = "biformer_small",
        num_classes: int = 150,
        head: str = "upernet",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        head_channels: int | None = None,
        aux_head: bool | None = None,
        aux_weight: float = 0.4,
        level_norm: bool = True,
        ignore_index: int = 255,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        no_weight_decay: list[str] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str = "poly",
        poly_power: float = 1.0,
        warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6,
        min_lr: float = 0.0,
        min_lr_ratio: float | None = None,
        inference: str = "whole",
        slide_crop: int = 512,
        slide_stride: int = 341,
        flip: bool = False,
        scales: Sequence[float] | None = None,
        max_nonfinite_steps: int = 10,
        dataset_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(max_nonfinite_steps, dataset_info)
        self.save_hyperparameters(ignore=["dataset_info"])
        if head not in _HEADS:
            raise ConfigError(f"model.head {head!r} is not supported: use one of {', '.join(_HEADS)}")
        if schedule not in ("poly", "cosine"):
            raise ConfigError(f"model.schedule {schedule!r} is not supported: use poly or cosine")
        if inference not in ("whole", "slide"):
            raise ConfigError(f"model.inference {inference!r} is not supported: use whole or slide")
        kwargs = dict(backbone_kwargs or {})
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        aux = head == "upernet" if aux_head is None else aux_head
        self.model = SegmentationNet(
            backbone,
            num_classes,
            head,
            head_channels,
            aux,
            level_norm,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            **kwargs,
        )
        self.metrics = SegmentationMetrics(num_classes, ignore_index)
        self.monitor = "val/mIoU"

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, num_classes, H, W)`` at the input size, with the configured inference mode and TTA."""
        hp = self.hparams
        scales = list(hp.scales) if hp.scales else [1.0]
        height, width = images.shape[-2:]
        total = 0.0
        for scale in scales:
            x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear")
            for flipped in (False, True) if hp.flip else (False,):
                inp = x.flip(-1) if flipped else x
                if hp.inference == "slide":
                    out = slide_inference(self.model, inp, hp.num_classes, hp.slide_crop, hp.slide_stride)
                else:
                    out = self.model(inp)
                out = out.flip(-1) if flipped else out
                total = total + F.interpolate(out, size=(height, width), mode="bilinear").softmax(1)
        return total / (len(scales) * (2 if hp.flip else 1))

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
        images, masks = batch[0], batch[1]
        logits, aux = self.model(images, with_aux=True)
        loss = F.cross_entropy(logits, masks, ignore_index=self.hparams.ignore_index)
        parts = {"loss_decode": loss}
        if aux is not None:
            parts["loss_aux"] = F.cross_entropy(aux, masks, ignore_index=self.hparams.ignore_index)
            loss = loss + self.hparams.aux_weight * parts["loss_aux"]
        return loss, parts, len(images)

    def _predict_original_size(self, images: Tensor, size: Sequence[int]) -> Tensor:
        probs = self(images)
        return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False).argmax(1)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, masks = batch[0], batch[1]  # NOTE: excluded images are not in them (no confusion-matrix update)
        self.excluded_images.update(batch)
        for i in range(len(images)):
            target = masks[i]
            self.metrics.update(self._predict_original_size(images[i : i + 1], target.shape[-2:])[0], target)

    def on_validation_epoch_end(self) -> None:
        stats = self.metrics.compute()
        self.metrics.reset()
        for name in ("mIoU", "mAcc", "aAcc"):
            self.log(f"val/{name}", stats[name], prog_bar=name == "mIoU", sync_dist=False)
        self.excluded_images.log_and_reset(self, "val")

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        stats = self.metrics.compute()
        self.metrics.reset()
        for name in ("mIoU", "mAcc", "aAcc"):
            self.log(f"test/{name}", stats[name], sync_dist=False)
        self.excluded_images.log_and_reset(self, "test")

    def predict_step(self, batch: tuple, batch_idx: int) -> dict[str, Any]:
        images, metas = batch[0], batch[2]
        preds = [
            self._predict_original_size(images[i : i + 1], meta["orig_size"])[0].cpu() for i, meta in enumerate(metas)
        ]
        return {"preds": preds, "names": [meta["name"] for meta in metas]}

    def input_sizes(self) -> dict[str, int]:
        return {"model.slide_crop": int(self.hparams.slide_crop)} if self.hparams.inference == "slide" else {}

    def render_predictions(self, batch: tuple, limit: int) -> list[Image.Image]:
        """Image | ground truth | prediction label maps, for each of the first ``limit`` images (original sizes)."""
        images, masks = batch[0][:limit], batch[1][:limit]
        mean, std = self.dataset_info.get("mean"), self.dataset_info.get("std")
        out = []
        for image, target in zip(images, masks):
            size = tuple(target.shape[-2:])
            with torch.no_grad():
                probs = F.interpolate(self(image[None]), size=size, mode="bilinear", align_corners=False)
            shown = Image.fromarray(to_uint8_image(image, mean, std)).resize(size[::-1], Image.BILINEAR)
            label_maps = probs.argmax(1)[0].cpu(), target.cpu()
            names, hp = self.dataset_info.get("class_names"), self.hparams
            out.append(
                render_segmentation(
                    np.asarray(shown), *label_maps, names, num_classes=hp.num_classes, ignore_index=hp.ignore_index
                )
            )
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_adamw(
            self.model,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            no_weight_decay=hp.no_weight_decay,
        )
        scheduler = MMCVLrSchedule(
            optimizer,
            hp.schedule,
            int(self.trainer.estimated_stepping_batches),
            warmup_iters=hp.warmup_iters,
            warmup_ratio=hp.warmup_ratio,
            power=hp.poly_power,
            min_lr=hp.min_lr,
            min_lr_ratio=hp.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_module(self) -> nn.Module:
        """The trained backbone as a full timm model (no classifier), so ``timm.create_model`` can load it."""
        hp = self.hparams
        return backbone_from_features(hp.backbone, self.model.backbone, **(hp.backbone_kwargs or {}))
