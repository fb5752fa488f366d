"""Detection task pieces: the timm FPN backbone, torchvision detectors on it, COCO evaluation, backbone export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops.misc import FrozenBatchNorm2d

import backbones  # noqa: F401  (registers the project's models)
from tasks.coco_evaluation import CocoEvaluator, detections_to_coco
from tasks.detection import DetectionTask
from tasks.heads.detectors import DatamoduleSizedTransform, build_detector
from tasks.heads.feature_pyramid import TimmFeaturePyramid

PICO = dict(n_win=2, window_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _targets(with_masks: bool) -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = []
    for image in images:
        h, w = image.shape[-2:]
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 3])}
        if with_masks:
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
                m[y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


@pytest.mark.parametrize("detector", ["retinanet", "maskrcnn"])
def test_training_step_reaches_the_backbone(detector: str) -> None:
    model = build_detector(
        detector, "strata_hybrid_pico", 3, (0.5,) * 3, (0.25,) * 3, fpn_channels=32, backbone_kwargs=PICO
    ).train()
    images, targets = _targets(with_masks=detector == "maskrcnn")
    losses = model(images, targets)
    expected = {"classification", "bbox_regression"} if detector == "retinanet" else {"loss_mask", "loss_objectness"}
    assert expected <= set(losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    stem = model.backbone.body.stem.conv1.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_eval_returns_detections_at_the_requested_sizes() -> None:
    model = build_detector(
        "maskrcnn", "strata_hybrid_pico", 3, (0.5,) * 3, (0.25,) * 3, fpn_channels=32, backbone_kwargs=PICO
    ).eval()
    model.roi_heads.score_thresh = 0.0
    images, _ = _targets(with_masks=False)
    with torch.no_grad():
        plain = model(images)
        with model.transform.output_sizes([(128, 160), (72, 64)]):
            scaled = model(images)
    assert plain[0]["masks"].shape[-2:] == (64, 80)  # no resize inside the model
    assert scaled[0]["masks"].shape[-2:] == (128, 160)
    torch.testing.assert_close(scaled[0]["boxes"], plain[0]["boxes"] * 2)
    torch.testing.assert_close(scaled[1]["boxes"], plain[1]["boxes"])
    assert model.transform._output_sizes is None  # the context restores the default


def test_transform_normalises_and_pads_without_resizing() -> None:
    transform = DatamoduleSizedTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    image = torch.rand(3, 50, 70)
    batch, _ = transform([image])
    assert batch.image_sizes == [(50, 70)]
    assert batch.tensors.shape[-2:] == (64, 96)
    torch.testing.assert_close(batch.tensors[0, :, :50, :70], (image - 0.5) / 0.25)


def test_frozen_stages_and_frozen_bn() -> None:
    pyramid = TimmFeaturePyramid("strata_hybrid_pico", out_channels=16, freeze_bn=True, frozen_stages=0, **PICO)
    frozen = {n.split(".")[0] for n, p in pyramid.body.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in pyramid.body.named_parameters() if p.requires_grad}
    assert frozen == {"stem", "stages_0"} and "stages_1" in trainable
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pyramid.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in pyramid.body.modules())
    pyramid.train()
    assert not pyramid.body.stem.training and pyramid.body.stages_1.training
    with pytest.raises(ValueError, match="frozen_stages=7"):
        TimmFeaturePyramid("strata_hybrid_pico", frozen_stages=7, **PICO)


def test_pyramid_levels_and_norms() -> None:
    pyramid = TimmFeaturePyramid("strata_hybrid_pico", out_indices=(1, 2, 3), out_channels=16, extra_blocks="p6p7")
    out = pyramid(torch.rand(1, 3, 96, 128))
    assert list(out) == ["0", "1", "2", "p6", "p7"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    assert all(v.shape[1] == 16 for v in out.values())


def test_exported_backbone_is_the_trained_one() -> None:
    task = DetectionTask("strata_hybrid_pico", num_classes=3, detector="retinanet", backbone_kwargs=PICO)
    with torch.no_grad():
        for p in task.model.backbone.body.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from any fresh init
    full = task.export_module().eval()
    body = task.model.backbone.body.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = body(x)
        ref = full.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for a, b in zip(feats, ref):
        torch.testing.assert_close(a, b)


def _write_coco(path: Path) -> dict:
    """Two images, two categories with non-contiguous ids, one crowd region."""
    masks = {}

    def ann(ann_id: int, image_id: int, cat: int, x: int, y: int, w: int, h: int, crowd: int = 0) -> dict:
        m = np.zeros((60, 80), dtype=np.uint8)
        m[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        masks[ann_id] = m
        return {
            "id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
            "area": float(w * h), "iscrowd": crowd, "segmentation": rle,
        }  # fmt: skip

    data = {
        "images": [
            {"id": 5, "file_name": "a.jpg", "height": 60, "width": 80},
            {"id": 9, "file_name": "b.jpg", "height": 60, "width": 80},
        ],
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}],
        "annotations": [
            ann(1, 5, 3, 5, 5, 20, 30),
            ann(2, 5, 7, 40, 10, 30, 40),
            ann(3, 9, 7, 10, 20, 25, 25),
            ann(4, 9, 3, 50, 5, 20, 20, crowd=1),
        ],
    }  # fmt: skip
    path.write_text(json.dumps(data))
    return masks


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_as_predictions_scores_ap_one(tmp_path: Path, iou_type: str) -> None:
    masks = _write_coco(tmp_path / "gt.json")
    category_ids = [3, 7]
    evaluator = CocoEvaluator(tmp_path / "gt.json", iou_types=(iou_type,))
    for image_id, anns in ((5, [(1, 1, 5, 5, 20, 30), (2, 2, 40, 10, 30, 40)]), (9, [(3, 2, 10, 20, 25, 25)])):
        detection = {
            "boxes": torch.tensor([[x, y, x + w, y + h] for _, _, x, y, w, h in anns], dtype=torch.float32),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([label for _, label, *_ in anns]),
            "masks": torch.stack([torch.from_numpy(masks[a[0]]).float()[None] for a in anns]),
        }
        records = detections_to_coco(detection, image_id, category_ids)
        assert {r["category_id"] for r in records} <= set(category_ids)
        evaluator.update(records, [image_id])
    stats = evaluator.compute()
    assert stats[f"{iou_type}_AP"] == pytest.approx(1.0)
    assert stats[f"{iou_type}_AP50"] == pytest.approx(1.0)

    (tmp_path / "pred.json").write_text(json.dumps(evaluator.records))  # what predictions_coco.json holds
    from pycocotools.coco import COCO

    loaded = COCO(str(tmp_path / "gt.json")).loadRes(str(tmp_path / "pred.json"))
    assert len(loaded.getAnnIds()) == 3


def test_no_detections_scores_zero(tmp_path: Path) -> None:
    _write_coco(tmp_path / "gt.json")
    evaluator = CocoEvaluator(tmp_path / "gt.json")
    evaluator.update([], [5, 9])
    assert evaluator.compute()["bbox_AP"] == 0.0


def test_roi_head_width_slims_the_mask_rcnn_heads() -> None:
    kwargs = dict(fpn_channels=32, backbone_kwargs=PICO)
    slim = build_detector("maskrcnn", "strata_hybrid_pico", 3, (0.5,) * 3, (0.25,) * 3, roi_head_width=16, **kwargs)
    wide = build_detector("maskrcnn", "strata_hybrid_pico", 3, (0.5,) * 3, (0.25,) * 3, **kwargs)
    assert slim.roi_heads.mask_head[0][0].out_channels == 16 and wide.roi_heads.mask_head[0][0].out_channels == 256
    assert (
        slim.roi_heads.box_predictor.cls_score.out_features == wide.roi_heads.box_predictor.cls_score.out_features == 4
    )
    assert slim.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4


@pytest.mark.parametrize("detector", ["retinanet", "maskrcnn"])
def test_bf16_autocast_step_and_eval(detector: str) -> None:
    model = build_detector(
        detector, "strata_hybrid_pico", 3, (0.5,) * 3, (0.25,) * 3, fpn_channels=32, backbone_kwargs=PICO
    ).train()
    images, targets = _targets(with_masks=detector == "maskrcnn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model.eval()(images)
    records = detections_to_coco(detections[0], 1, [3, 7, 9])
    assert all(isinstance(r["bbox"][0], float) for r in records)


def _gather_worker(rank: int, world: int, port: int, annotation_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        evaluator = CocoEvaluator(annotation_file)
        image_id = (5, 9)[rank]  # each rank evaluates one image
        boxes = {5: [[5.0, 5.0, 25.0, 35.0], [40.0, 10.0, 70.0, 50.0]], 9: [[10.0, 20.0, 35.0, 45.0]]}[image_id]
        labels = {5: [1, 2], 9: [2]}[image_id]
        detection = {"boxes": torch.tensor(boxes), "scores": torch.ones(len(boxes)), "labels": torch.tensor(labels)}
        evaluator.update(detections_to_coco(detection, image_id, [3, 7]), [image_id])
        evaluator.gather()
        queue.put((rank, sorted(evaluator.image_ids), len(evaluator.records), evaluator.compute()["bbox_AP"]))
    finally:
        dist.destroy_process_group()


def test_evaluator_gathers_every_rank_once(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    _write_coco(tmp_path / "gt.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, str(tmp_path / "gt.json"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[1] for r in results] == [[5, 9], [5, 9]]  # both ranks see both images, once
    assert [r[2] for r in results] == [3, 3]
    assert results[0][3] == results[1][3] == pytest.approx(1.0)  # together the two halves are the ground truth
