"""The COCO recipes (configs/coco/*.yaml) against their sources: BiFormer's mmdetection 2.x configs.

Each recipe's detector is built from its YAML and its values are read back through torchvision's own objects; the
pieces written to mmdet's semantics (P6 on C5, RoI pooling, the RetinaNet loss, weight-decay groups, the schedule)
are checked against those semantics computed independently here.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import roi_align

import backbones  # noqa: F401  (registers the project's models)
from tasks.coco_evaluation import detections_to_coco
from tasks.detection import DetectionTask
from tasks.heads.anchors_and_assigners import ExactAnchorGenerator, MaxIoUAssigner
from tasks.heads.feature_pyramid import ExtraLevelsOnInput
from tasks.heads.mask_rcnn import L1RegionProposalNetwork, L1RoIHeads, RoIExtractor
from tasks.heads.retinanet import ForegroundRetinaNet, PooledLossRetinaNetHead
from tasks.lr_schedules import MMCVLrSchedule
from tests.support.official_names import biformer_name_to_official

REPO = Path(__file__).resolve().parents[2]
COCO_ITERS_PER_EPOCH = 7330  # 117266 training images with instances / (2 images x 8 GPUs), mmdet's sampler padding


def _init_args(config: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "coco" / config).read_text())["model"]["init_args"]


@pytest.fixture(scope="module")
def maskrcnn() -> DetectionTask:
    torch.manual_seed(0)
    return DetectionTask(num_classes=80, **_init_args("maskrcnn_biformer_small_1x.yaml"))


@pytest.fixture(scope="module")
def retinanet() -> DetectionTask:
    torch.manual_seed(0)
    return DetectionTask(num_classes=80, **_init_args("retinanet_biformer_small_1x.yaml"))


def _configure(task: DetectionTask, iters_per_epoch: int, epochs: int = 12) -> tuple[torch.optim.Optimizer, object]:
    task.trainer = SimpleNamespace(
        estimated_stepping_batches=iters_per_epoch * epochs,
        num_training_batches=iters_per_epoch,
        accumulate_grad_batches=1,
        max_epochs=epochs,
    )
    config = task.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def _lr_at(optimizer: torch.optim.Optimizer, scheduler: MMCVLrSchedule, iteration: int) -> list[float]:
    """The LR of every group at ``iteration``, stepped as Lightning steps it: ``step_update(global_step)`` after each
    optimizer update (iteration 0 runs at the rate set when the scheduler was built)."""
    if iteration > 0:
        scheduler.step_update(num_updates=iteration)
    return [group["lr"] for group in optimizer.param_groups]


def _mmdet_step_lr(iteration: int, iters_per_epoch: int, base: float = 1e-4) -> float:
    """mmcv 1.x ``StepLrUpdaterHook(step=[8, 11])`` with ``warmup='linear', warmup_iters=500, warmup_ratio=0.001``."""
    epoch = iteration // iters_per_epoch
    regular = base * 0.1 ** len([s for s in (8, 11) if epoch >= s])
    if iteration >= 500:
        return regular
    k = (1 - iteration / 500) * (1 - 0.001)
    return regular * (1 - k)


@pytest.mark.parametrize("recipe", ["maskrcnn", "retinanet"])
def test_the_schedule_is_mmdets_1x(recipe: str, request: pytest.FixtureRequest) -> None:
    task = request.getfixturevalue(recipe)
    optimizer, scheduler = _configure(task, COCO_ITERS_PER_EPOCH)
    spe = COCO_ITERS_PER_EPOCH
    checkpoints = [0, 250, 499, 500, 8 * spe - 1, 8 * spe, 11 * spe - 1, 11 * spe, 12 * spe - 1]
    for iteration in checkpoints:
        for lr in _lr_at(optimizer, scheduler, iteration):
            assert lr == pytest.approx(_mmdet_step_lr(iteration, spe), rel=1e-12), iteration
    # the figures themselves: 1e-7 at the first iteration, x0.1 from the first iteration of epoch 8, not before
    _, scheduler = _configure(task, spe)
    assert [scheduler._get_lr(i)[0] for i in (0, 8 * spe - 1, 8 * spe, 11 * spe)] == pytest.approx(
        [1e-7, 1e-4, 1e-5, 1e-6], rel=1e-12
    )


def test_maskrcnn_values_are_mmdets(maskrcnn: DetectionTask) -> None:
    model = maskrcnn.model
    rpn, heads = model.rpn, model.roi_heads
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert rpn.nms_thresh == 0.7 and rpn.proposal_matcher.allow_low_quality_matches
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
    assert [a[0] for a in rpn.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    assert (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert (heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold) == (0.5, 0.5)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)  # mmdet target_stds (0.1, 0.1, 0.2, 0.2)
    for pool, size in ((heads.box_roi_pool, 7), (heads.mask_roi_pool, 14)):
        assert isinstance(pool, RoIExtractor)
        assert (pool.output_size, pool.sampling_ratio, pool.strides) == ((size, size), 0, [4, 8, 16, 32])
    assert heads.box_head.fc6.out_features == heads.box_head.fc7.out_features == 1024
    assert isinstance(rpn, L1RegionProposalNetwork) and isinstance(heads, L1RoIHeads)
    assert (rpn.proposal_matcher.min_pos_iou, heads.proposal_matcher.min_pos_iou) == (0.3, 0.5)
    assert isinstance(rpn.anchor_generator, ExactAnchorGenerator)
    # mmdet's Shared2FCBBoxHead init: Xavier-uniform FCs, N(0, 0.01) classifier, N(0, 0.001) regressor
    fc6 = heads.box_head.fc6.weight
    assert fc6.abs().max() <= math.sqrt(6 / (fc6.shape[0] + fc6.shape[1])) and heads.box_head.fc6.bias.abs().max() == 0
    assert heads.box_predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert heads.box_predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert model.backbone.fpn.extra_blocks.__class__.__name__ == "LastLevelMaxPool"


def test_retinanet_values_are_mmdets(retinanet: DetectionTask) -> None:
    model = retinanet.model
    assert isinstance(model, ForegroundRetinaNet) and isinstance(model.head, PooledLossRetinaNetHead)
    assert model.head.classification_head.num_classes == 80  # one sigmoid output per class, no background column
    assert (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates) == (
        0.05,
        0.5,
        100,
        1000,
    )
    matcher = model.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches) == (0.5, 0.4, True)
    assert model.head.regression_head._loss_type == "l1"
    # mmdet AnchorGenerator(octave_base_scale=4, scales_per_octave=3, strides 8..128)
    expected = [4 * s * 2 ** (k / 3) for s in (8, 16, 32, 64, 128) for k in range(3)]
    assert [s for sizes in model.anchor_generator.sizes for s in sizes] == pytest.approx(expected)
    extra = model.backbone.fpn.extra_blocks
    assert isinstance(extra, ExtraLevelsOnInput) and extra.p6.in_channels == 512  # C5 of BiFormer-S


def test_retinanet_p6_comes_from_c5_and_p7_from_p6_without_relu() -> None:
    torch.manual_seed(0)
    extra = ExtraLevelsOnInput(in_channels=8, out_channels=8)  # in == out: torchvision's LastLevelP6P7 would use P5
    c5, p5 = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    levels, names = extra([p5], [torch.randn(1, 4, 16, 16), c5], ["0"])
    assert names == ["0", "p6", "p7"]
    torch.testing.assert_close(levels[1], torch.nn.functional.conv2d(c5, extra.p6.weight, extra.p6.bias, 2, 1))
    torch.testing.assert_close(levels[2], torch.nn.functional.conv2d(levels[1], extra.p7.weight, extra.p7.bias, 2, 1))


def test_backbone_batchnorm_statistics_stay_fixed_and_affine_trains(retinanet: DetectionTask) -> None:
    retinanet.train()
    bns = [m for m in retinanet.model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 5 and not any(bn.training for bn in bns)  # stem x2, downsample x3 (mmdet norm_eval)
    assert all(bn.weight.requires_grad and bn.bias.requires_grad for bn in bns)
    before = [bn.running_mean.clone() for bn in bns]
    retinanet.model.backbone.body(torch.randn(1, 3, 64, 64))
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))


def _official_name(name: str) -> str:
    """A detection model parameter's name in mmdet's BiFormer_mm model (backbone.* from models/biformer.py)."""
    if name.startswith("backbone.body."):
        inner = name.removeprefix("backbone.body.").replace("stages_", "stages.")
        return "backbone." + biformer_name_to_official(inner)
    return name.replace("backbone.level_norms.", "backbone.extra_norms.")


def test_maskrcnn_weight_decay_exempts_exactly_the_official_norm_keys(maskrcnn: DetectionTask) -> None:
    optimizer, _ = _configure(maskrcnn, 100)
    params = dict(maskrcnn.model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    no_decay = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    keys = ("norm", "absolute_pos_embed", "relative_position_bias_table")  # maskrcnn.1x.biformer_small.py:51-53
    official = {n for n in params if any(k in _official_name(n) for k in keys)}
    assert no_decay == official and decay == set(params) - official
    assert any(".norm1." in n for n in no_decay) and not any("stem" in n or "downsample" in n for n in no_decay)
    assert "backbone.body.stem.norm1.weight" in decay  # official downsample_layers.0.1: no 'norm' in it


def test_retinanet_decays_every_parameter(retinanet: DetectionTask) -> None:
    optimizer, _ = _configure(retinanet, 100)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4]
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(
        p.numel() for p in retinanet.model.parameters() if p.requires_grad
    )


def test_roi_extractor_is_mmdets_single_roi_extractor() -> None:
    extractor = RoIExtractor(["0", "1", "2", "3"], output_size=2, strides=[4, 8, 16, 32])
    sizes = torch.tensor([20.0, 55.0, 56.0, 111.0, 112.0, 224.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros_like(sizes), torch.zeros_like(sizes), torch.zeros_like(sizes), sizes, sizes], 1)
    expected = [min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), 3) for s in sizes.tolist()]
    assert extractor.roi_levels(rois).tolist() == expected == [0, 0, 0, 0, 1, 2, 3, 3]
    # RoIAlign with aligned=True on a ramp (value = x): each bin averages its sample points' x, shifted by -0.5
    ramp = torch.arange(32.0).expand(1, 1, 32, 32).contiguous()
    features = {str(i): ramp for i in range(4)}
    box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])  # 32 px: level 0, stride 4 -> x from 2 to 10 on the map
    pooled = extractor(features, [box], [(128, 128)])
    bin_width = (40 - 8) / 4 / 2
    expected_x = torch.tensor([8 / 4 - 0.5 + (j + 0.5) * bin_width for j in range(2)])
    torch.testing.assert_close(pooled[0, 0, 0], expected_x)
    unaligned = roi_align(ramp, torch.tensor([[0.0, 8, 8, 40, 40]]), 2, 0.25, 0, aligned=False)
    assert not torch.allclose(unaligned[0, 0, 0], expected_x)


def test_retinanet_loss_is_normalised_by_the_batch_positives() -> None:
    torch.manual_seed(0)
    head = PooledLossRetinaNetHead(8, 1, 3)
    reference = RetinaNetHead(8, 1, 3)
    reference.load_state_dict(head.state_dict())
    anchors = [torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 30, 30], [10, 10, 40, 40]])] * 2
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[0.0, 0, 28, 28], [10, 10, 41, 41]]), "labels": torch.tensor([0, 1])},
    ]
    matched = [torch.tensor([0, -1, -2, -1]), torch.tensor([-1, -1, 0, 1])]  # -1 background, -2 ignored
    outputs = {"cls_logits": torch.randn(2, 4, 3), "bbox_regression": torch.randn(2, 4, 4)}
    ours = head.compute_loss(targets, outputs, anchors, matched)
    per_image = [
        reference.compute_loss([t], {k: v[i : i + 1] for k, v in outputs.items()}, [a], [m])
        for i, (t, a, m) in enumerate(zip(targets, anchors, matched))
    ]
    positives = [1, 2]  # torchvision: per image sum / positives_i; mmdet: total sum / total positives
    for key in ("classification", "bbox_regression"):
        total = sum(loss[key] * p for loss, p in zip(per_image, positives))
        torch.testing.assert_close(ours[key], total / sum(positives))
        assert not torch.allclose(ours[key], reference.compute_loss(targets, outputs, anchors, matched)[key])


def test_retinanet_never_reports_the_background_label() -> None:
    torch.manual_seed(0)
    task = DetectionTask(
        backbone="strata_hybrid_pico",
        backbone_kwargs={"n_win": 2, "window_size": 2},
        num_classes=3,
        detector="retinanet",
        fpn_channels=16,
        detector_kwargs={"score_thresh": 0.5, "detections_per_img": 50},
    ).eval()
    cls_logits = task.model.head.classification_head.cls_logits
    torch.nn.init.zeros_(cls_logits.weight)
    cls_logits.bias.data = torch.tensor([5.0, -5.0, -5.0] * 9)  # class index 0 scores highest everywhere
    with torch.no_grad():
        detections = task([torch.rand(3, 64, 64)])
    labels = detections[0]["labels"]
    assert len(labels) and labels.min() >= 1 and labels.max() <= 3 and (labels == 1).all()
    assert detections_to_coco(detections[0], image_id=1, category_ids=[5, 7, 9])[0]["category_id"] == 5
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        detections_to_coco({**detections[0], "labels": labels - 1}, image_id=1, category_ids=[5, 7, 9])
    task.train()
    images = [torch.rand(3, 64, 64)]
    losses = task.model(images, [{"boxes": torch.tensor([[4.0, 4, 40, 40]]), "labels": torch.tensor([3])}])
    assert torch.isfinite(sum(losses.values()))  # label K trains the last of the K outputs


def _mmdet_base_anchors(size: float, ratios: list[float]) -> torch.Tensor:
    """mmdet 2.x ``AnchorGenerator.gen_single_level_base_anchors`` (center_offset 0, one scale)."""
    h_ratios = torch.sqrt(torch.tensor(ratios))
    w_ratios = 1 / h_ratios
    ws, hs = size * w_ratios, size * h_ratios
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def test_anchors_are_mmdets_not_rounded() -> None:
    generator = ExactAnchorGenerator(((32.0,), (40.317,)), ((0.5, 1.0, 2.0),) * 2)
    images = ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)])
    features = [torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)]  # strides 8 and 16
    anchors = generator(images, features)[0]
    expected = []
    for size, stride, side in ((32.0, 8, 4), (40.317, 16, 2)):
        shifts = torch.tensor(
            [[x * stride, y * stride] * 2 for y in range(side) for x in range(side)], dtype=torch.float
        )
        expected.append((shifts[:, None, :] + _mmdet_base_anchors(size, [0.5, 1.0, 2.0])[None]).reshape(-1, 4))
    torch.testing.assert_close(anchors, torch.cat(expected))
    assert anchors[0, 0].item() == pytest.approx(-0.5 * 32 / math.sqrt(0.5))  # 22.627, torchvision's rounds to 23


def _mmdet_max_iou_assign(iou: torch.Tensor, pos: float, neg: float, min_pos: float) -> torch.Tensor:
    """mmdet 2.x ``MaxIoUAssigner.assign_wrt_overlaps`` (gt_max_assign_all, match_low_quality) in torchvision's
    codes: -1 background, -2 ignored, else the ground-truth index."""
    assigned = torch.full((iou.shape[1],), -2, dtype=torch.long)
    max_overlaps, argmax = iou.max(dim=0)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg)] = -1
    assigned[max_overlaps >= pos] = argmax[max_overlaps >= pos]
    gt_max = iou.max(dim=1).values
    for i in range(iou.shape[0]):
        if gt_max[i] >= min_pos:
            assigned[iou[i] == gt_max[i]] = i
    return assigned


def test_assigner_is_mmdets_max_iou_assigner() -> None:
    generator = torch.Generator().manual_seed(0)
    differs_from_torchvision = 0
    for _ in range(200):
        iou = (torch.rand(4, 30, generator=generator) * 0.8).round(decimals=1)  # ties, best IoUs below 0.3 too
        for pos, neg, min_pos in ((0.7, 0.3, 0.3), (0.5, 0.4, 0.0), (0.5, 0.5, 0.5)):
            ours = MaxIoUAssigner(pos, neg, min_pos)(iou)
            assert torch.equal(ours, _mmdet_max_iou_assign(iou, pos, neg, min_pos))
            differs_from_torchvision += not torch.equal(ours, Matcher(pos, neg, allow_low_quality_matches=True)(iou))
    assert differs_from_torchvision > 0


def test_rpn_box_loss_is_l1_over_the_sampled_anchors(maskrcnn: DetectionTask) -> None:
    rpn = maskrcnn.model.rpn
    labels = [torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0, 0.0])]
    targets = [torch.randn(6, 4)]
    deltas, objectness = torch.randn(6, 4), torch.randn(6, 1)
    torch.manual_seed(0)
    objectness_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)
    sampled = [0, 1, 3, 4, 5]  # every positive and negative: fewer than 256
    positive = [0, 3]
    expected = (deltas[positive] - targets[0][positive]).abs().sum() / len(sampled)
    torch.testing.assert_close(box_loss, expected)
    expected_obj = torch.nn.functional.binary_cross_entropy_with_logits(objectness[sampled, 0], labels[0][sampled])
    torch.testing.assert_close(objectness_loss, expected_obj)


def test_rcnn_box_loss_is_l1_of_the_sampled_rois() -> None:
    torch.manual_seed(0)
    task = DetectionTask(
        backbone="strata_hybrid_pico",
        backbone_kwargs={"n_win": 2, "window_size": 2},
        num_classes=3,
        fpn_channels=16,
        roi_head_width=16,
    ).train()
    heads = task.model.roi_heads
    torch.nn.init.zeros_(heads.box_predictor.bbox_pred.weight)
    torch.nn.init.zeros_(heads.box_predictor.bbox_pred.bias)  # deltas 0: the L1 loss is sum |t| / RoIs
    images = [torch.rand(3, 64, 64)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4, 40, 40], [30, 20, 60, 50]]),
            "labels": torch.tensor([1, 3]),
            "masks": torch.zeros(2, 64, 64, dtype=torch.uint8),
        }
    ]
    features = task.model.backbone(torch.stack(images))
    proposals = [torch.tensor([[5.0, 5, 38, 41], [0, 0, 64, 64], [28, 22, 58, 52], [10, 40, 30, 60]])]
    torch.manual_seed(1)
    _, losses = heads(features, proposals, [(64, 64)], targets)
    torch.manual_seed(1)
    _, _, labels, regression = heads.select_training_samples(proposals, targets)  # the same samples again
    labels_t, regression_t = torch.cat(labels), torch.cat(regression)
    expected = regression_t[labels_t > 0].abs().sum() / labels_t.numel()
    torch.testing.assert_close(losses["loss_box_reg"], expected)
    smooth = (
        torch.nn.functional.smooth_l1_loss(
            torch.zeros_like(regression_t[labels_t > 0]), regression_t[labels_t > 0], beta=1 / 9, reduction="sum"
        )
        / labels_t.numel()
    )
    assert not torch.allclose(losses["loss_box_reg"], smooth)


def test_retinanet_test_candidates_are_mmdets_top_anchors() -> None:
    torch.manual_seed(0)
    task = DetectionTask(
        backbone="strata_hybrid_pico",
        backbone_kwargs={"n_win": 2, "window_size": 2},
        num_classes=2,
        detector="retinanet",
        fpn_channels=16,
        detector_kwargs={"topk_candidates": 2, "score_thresh": 0.05},
    )
    model = task.model
    # three anchors far apart (NMS keeps everything); scores per anchor (class 0, class 1)
    probs = torch.tensor([[0.9, 0.8], [0.85, 0.1], [0.7, 0.6]])
    logits = torch.logit(probs)[None]
    anchors = [[torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [100, 0, 110, 10]])]]
    out = model.postprocess_detections(
        {"cls_logits": [logits], "bbox_regression": [torch.zeros(1, 3, 4)]}, anchors, [(200, 200)]
    )[0]
    # mmdet: the 2 anchors with the best top score (0, 1), then every pair of them above 0.05: 4 detections
    assert out["labels"].tolist() == [0, 0, 1, 1]  # sorted by score; torchvision keeps only the top 2 pairs
    assert out["scores"].tolist() == pytest.approx([0.9, 0.85, 0.8, 0.1])
