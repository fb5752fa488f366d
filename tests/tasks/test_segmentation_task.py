"""Segmentation task pieces: benchmark metrics, decode heads, sliding-window inference, PNG predictions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import backbones  # noqa: F401  (registers the project's models)
from runs.prediction_writers import SegmentationPredictionWriter
from tasks.heads.segmentation_heads import FCNHead, SemanticFPNHead, UperNetHead
from tasks.segmentation import SegmentationTask, slide_inference
from tasks.segmentation_metrics import SegmentationMetrics

PICO = dict(n_win=2, window_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_equal_the_hand_computed_confusion_matrix() -> None:
    # 4 classes; class 3 never occurs (NaN, skipped); 255 pixels ignored whatever is predicted there
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    metric = SegmentationMetrics(4)
    metric.update(preds, target)
    out = metric.compute()
    # confusion (rows = truth): c0: [1,1,0,0], c1: [0,2,0,0], c2: [1,0,1,0]
    iou = [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]
    acc = [1 / 2, 2 / 2, 1 / 2]
    assert out["mIoU"].item() == pytest.approx(sum(iou) / 3)
    assert out["mAcc"].item() == pytest.approx(sum(acc) / 3)
    assert out["aAcc"].item() == pytest.approx(4 / 6)
    assert math.isnan(out["IoU_per_class"][3].item())


def test_metrics_sum_over_the_dataset_not_per_image() -> None:
    a_t, a_p = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])  # image 1: class 1 missed
    b_t, b_p = torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1])  # image 2: perfect
    metric = SegmentationMetrics(2)
    metric.update(a_p, a_t)
    metric.update(b_p, b_t)
    whole = SegmentationMetrics(2)
    whole.update(torch.cat([a_p, b_p]), torch.cat([a_t, b_t]))
    assert metric.compute()["mIoU"] == whole.compute()["mIoU"]
    dataset = (3 / 4 + 4 / 5) / 2
    per_image_mean = ((3 / 4 + 0) / 2 + 1.0) / 2
    assert metric.compute()["mIoU"].item() == pytest.approx(dataset)
    assert dataset != pytest.approx(per_image_mean)


def test_metrics_reject_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        SegmentationMetrics(3).update(torch.tensor([0]), torch.tensor([3]))


class _Pointwise(nn.Module):
    """Per-pixel model: its output at a pixel does not depend on the crop around it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(("size", "crop", "stride"), [((40, 56), 64, 42), ((70, 90), 32, 21), ((33, 20), 16, 16)])
def test_slide_inference_equals_whole_for_a_pointwise_model(size: tuple[int, int], crop: int, stride: int) -> None:
    torch.manual_seed(0)
    model, x = _Pointwise(), torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(model, x, 5, crop, stride), model(x))


def test_slide_inference_with_a_covering_crop_is_whole_image_inference() -> None:
    task = SegmentationTask("strata_hybrid_pico", num_classes=4, head="semfpn", backbone_kwargs=PICO).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        whole = task(x)
        task.hparams.inference, task.hparams.slide_crop = "slide", 64
        torch.testing.assert_close(task(x), whole)


@pytest.mark.parametrize("head", [UperNetHead, SemanticFPNHead])
def test_decode_heads_map_four_levels_to_stride_4(head: type[nn.Module]) -> None:
    chans = [8, 16, 24, 32]
    feats = [torch.randn(2, c, math.ceil(50 / s), math.ceil(70 / s)) for c, s in zip(chans, (4, 8, 16, 32))]
    out = head(chans, 6, 16)(feats)
    assert out.shape == (2, 6, 13, 18)
    assert FCNHead(24, 6, 8)(feats[2]).shape == (2, 6, 4, 5)


@pytest.mark.parametrize("head", ["upernet", "semfpn"])
def test_training_step_gradients_reach_the_backbone(head: str) -> None:
    task = SegmentationTask(
        "strata_hybrid_pico", num_classes=4, head=head, head_channels=16, backbone_kwargs=PICO
    ).train()
    images = torch.randn(2, 3, 64, 64)
    masks = torch.randint(0, 4, (2, 64, 64))
    masks[:, :8] = 255
    logits, aux = task.model(images, with_aux=True)
    assert logits.shape == (2, 4, 64, 64) and (aux is not None) == (head == "upernet")
    loss = nn.functional.cross_entropy(logits, masks, ignore_index=255)
    loss.backward()
    assert task.model.backbone.stem.conv1.weight.grad.abs().sum() > 0


def test_predict_pngs_reread_to_the_same_labels(tmp_path: Path) -> None:
    writer = SegmentationPredictionWriter(tmp_path)
    preds = [torch.randint(0, 150, (17, 23)), torch.randint(0, 150, (9, 5))]
    writer.write_on_batch_end(None, None, {"preds": preds, "names": ["a", "b"]}, None, None, 0)
    for pred, name in zip(preds, ["a", "b"]):
        with Image.open(tmp_path / "predictions" / f"{name}.png") as image:
            assert image.mode == "L"
            assert np.array_equal(np.asarray(image), pred.numpy() + 1)  # ADE20K values: class + 1


def test_exported_backbone_is_the_trained_one() -> None:
    task = SegmentationTask("strata_hybrid_pico", num_classes=4, head="semfpn", backbone_kwargs=PICO)
    full = task.export_module().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = task.model.backbone.eval()(x)
        ref = full.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(feats, ref):
        torch.testing.assert_close(a, b)
