"""The ADE20K recipes (configs/ade20k/*.yaml) against their sources: BiFormer's mmsegmentation 0.x configs.

Each recipe's model is built from its YAML; the schedule is compared with mmcv 1.x's ``PolyLrUpdaterHook`` /
``CosineAnnealingLrUpdaterHook`` formulas (linear warmup scaling the scheduled rate, by iteration) computed here, and
the weight-decay groups with mmcv's ``custom_keys`` rule applied to the official parameter names.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import backbones  # noqa: F401  (registers the project's models)
from tasks.heads.segmentation_heads import FCNHead, SemanticFPNHead, UperNetHead
from tasks.segmentation import SegmentationTask
from tests.support.official_names import biformer_name_to_official

REPO = Path(__file__).resolve().parents[2]


def _recipe(config: str) -> tuple[dict, dict]:
    full = yaml.safe_load((REPO / "configs" / "ade20k" / config).read_text())
    return full["model"]["init_args"], full["trainer"]


@pytest.fixture(scope="module")
def upernet() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=150, **_recipe("upernet_biformer_small_160k.yaml")[0])


@pytest.fixture(scope="module")
def semfpn() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=150, **_recipe("semfpn_biformer_small_80k.yaml")[0])


def _configure(task: SegmentationTask, total_iters: int) -> tuple[torch.optim.Optimizer, object]:
    task.trainer = SimpleNamespace(estimated_stepping_batches=total_iters, max_epochs=-1)
    config = task.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def _lrs(task: SegmentationTask, total_iters: int, iterations: list[int]) -> list[float]:
    """The LR at each of ``iterations``, stepped as Lightning steps it (``step_update(global_step)`` per update)."""
    optimizer, scheduler = _configure(task, total_iters)
    out = []
    for iteration in iterations:
        if iteration > 0:
            scheduler.step_update(num_updates=iteration)
        lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(lrs) == 1  # decay groups differ in weight decay only
        out.append(lrs.pop())
    return out


def _mmcv_linear_warmup(regular: float, iteration: int, warmup_iters: int, ratio: float) -> float:
    if iteration >= warmup_iters:
        return regular
    return regular * (1 - (1 - iteration / warmup_iters) * (1 - ratio))


def test_upernet_schedule_is_mmsegs_poly_160k(upernet: SegmentationTask) -> None:
    _, trainer = _recipe("upernet_biformer_small_160k.yaml")
    total = trainer["max_steps"]
    assert total == 160000 and trainer["val_check_interval"] == 16000
    iterations = [0, 750, 1499, 1500, 80000, 159999]

    def mmseg(i: int) -> float:  # PolyLrUpdaterHook(power=1.0, min_lr=0.0), warmup 1500 x 1e-6
        regular = (6e-5 - 0.0) * (1 - i / total) ** 1.0 + 0.0
        return _mmcv_linear_warmup(regular, i, 1500, 1e-6)

    assert _lrs(upernet, total, iterations) == pytest.approx([mmseg(i) for i in iterations], rel=1e-12)
    assert mmseg(0) == pytest.approx(6e-5 * 1e-6) and mmseg(80000) == pytest.approx(3e-5)


def test_semfpn_schedule_is_mmsegs_cosine_80k(semfpn: SegmentationTask) -> None:
    _, trainer = _recipe("semfpn_biformer_small_80k.yaml")
    total = trainer["max_steps"]
    assert total == 80000 and trainer["val_check_interval"] == 4000
    iterations = [0, 500, 999, 1000, 40000, 79999]

    def mmseg(i: int) -> float:  # CosineAnnealingLrUpdaterHook(min_lr_ratio=1e-8), warmup 1000 x 0.1
        base = 2e-4
        target = base * 1e-8
        regular = target + 0.5 * (base - target) * (math.cos(math.pi * i / total) + 1)
        return _mmcv_linear_warmup(regular, i, 1000, 0.1)

    assert _lrs(semfpn, total, iterations) == pytest.approx([mmseg(i) for i in iterations], rel=1e-12)
    assert mmseg(0) == pytest.approx(2e-5) and mmseg(40000) == pytest.approx(1e-4, rel=1e-6)


def _official_name(name: str) -> str:
    """A segmentation parameter's name in mmseg's EncoderDecoder with BiFormer_mm (heads have no 'norm' there)."""
    if name.startswith("model.backbone."):
        inner = name.removeprefix("model.backbone.").replace("stages_", "stages.")
        return "backbone." + biformer_name_to_official(inner)
    if name.startswith("model.level_norms."):
        return name.replace("model.level_norms.", "backbone.extra_norms.")
    assert "norm" not in name, name  # mmseg's heads name their BatchNorm 'bn'
    return name.replace("model.", "", 1)


def test_upernet_weight_decay_exempts_exactly_the_official_norm_keys(upernet: SegmentationTask) -> None:
    optimizer, _ = _configure(upernet, 100)
    names = {id(p): n for n, p in upernet.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    keys = ("norm", "absolute_pos_embed", "relative_position_bias_table")  # upernet.biformer_small.py:55-57
    official = {n for n in names.values() if any(k in _official_name(n) for k in keys)}
    assert no_decay == official and len(official) > 0
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    assert "model.backbone.stem.norm1.weight" in decayed and "model.decode_head.bottleneck.1.weight" in decayed


def test_semfpn_decays_every_parameter(semfpn: SegmentationTask) -> None:
    optimizer, _ = _configure(semfpn, 100)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4]
    assert len(optimizer.param_groups[0]["params"]) == len([p for p in semfpn.parameters() if p.requires_grad])


def test_heads_are_the_sources_heads(upernet: SegmentationTask, semfpn: SegmentationTask) -> None:
    up, aux = upernet.model.decode_head, upernet.model.aux_head
    assert isinstance(up, UperNetHead) and up.cls.in_channels == 512 and up.dropout.p == 0.1
    assert [branch[0].output_size for branch in up.ppm] == [1, 2, 3, 6]
    assert isinstance(aux, FCNHead) and aux.conv[0].in_channels == 256 and aux.conv[0].out_channels == 256
    assert upernet.hparams.aux_weight == 0.4
    fpn = semfpn.model.decode_head
    assert isinstance(fpn, SemanticFPNHead) and semfpn.model.aux_head is None
    assert fpn.lateral[0].out_channels == 256 and fpn.cls.in_channels == 128 and fpn.dropout.p == 0.1
    for task, n_win in ((upernet, 8), (semfpn, 8)):
        attn = task.model.backbone.stages_0.blocks[0].attn
        assert (attn.n_win, attn.pad_mode) == (n_win, "official")


def test_semfpn_test_resize_is_align_resize() -> None:
    import albumentations as A
    import cv2
    import numpy as np
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from datamodules.detection_transforms import KeepRatioResize
    from datamodules.segmentation_transforms import build_segmentation_transform

    transform = build_segmentation_transform(train=False, eval_short_side=512, eval_size_divisor=32)
    keep_ratio = A.Compose([KeepRatioResize(2048, 512)])
    normalize = A.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, max_pixel_value=255.0)
    rng = np.random.default_rng(0)
    for height, width in ((512, 683), (375, 500), (600, 411), (256, 256)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        factor = min(2048 / max(height, width), 512 / min(height, width))  # mmcv imrescale into (2048, 512)
        rescaled = (int(height * factor + 0.5), int(width * factor + 0.5))
        aligned = (math.ceil(rescaled[0] / 32) * 32, math.ceil(rescaled[1] / 32) * 32)  # align_resize.py _align
        out = transform(image=image)["image"]
        assert out.shape[:2] == aligned
        plain = keep_ratio(image=image)["image"]  # uint8, as mmseg resizes before Normalize
        assert plain.shape[:2] == rescaled
        expected = cv2.resize(plain, aligned[::-1], interpolation=cv2.INTER_LINEAR) if aligned != rescaled else plain
        np.testing.assert_allclose(out, normalize(image=expected)["image"], atol=1e-6)


def test_heads_are_initialised_as_mmseg(upernet: SegmentationTask, semfpn: SegmentationTask) -> None:
    head = upernet.model.decode_head
    assert head.cls.weight.std().item() == pytest.approx(0.01, rel=0.1) and head.cls.bias.abs().max() == 0
    conv = head.fpn_bottleneck[0].weight  # Kaiming normal, fan_out = out_channels * k * k, ReLU gain
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    lateral = semfpn.model.decode_head.lateral[3]  # the FPN neck: Xavier uniform
    bound = math.sqrt(6 / (lateral.in_channels + lateral.out_channels))
    assert lateral.weight.abs().max() <= bound and lateral.weight.abs().max() > 0.9 * bound
