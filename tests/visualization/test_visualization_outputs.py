"""Prediction overlays, validation callback, predict writers' overlays, training curves and the visualize command."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image

import backbones  # noqa: F401  (registers the project's models)
from runs.overlays import ValidationOverlays, log_images
from runs.prediction_writers import CocoPredictionWriter, SegmentationPredictionWriter
from tasks.coco_evaluation import detections_to_coco
from tests.support.scripts import load_script
from visualization.curves import plot_training_curves, read_metrics
from visualization.overlays import (
    IGNORE_COLOR,
    TITLE_HEIGHT,
    class_palette,
    default_zoom,
    render_classification,
    render_detection,
    render_segmentation,
)

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NAMES = ["circle", "square", "triangle", "star"]


def _png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == "PNG"
    return image


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_segmentation_overlay_shows_the_label_maps_beside_the_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (24, 20))
    target = rng.integers(0, 4, (24, 20))
    target[:3] = 255
    picture = render_segmentation(_image(24, 20), pred, target, NAMES, ignore_index=255, zoom=3)
    picture.save(tmp_path / "seg.png")
    array = np.asarray(_png(tmp_path / "seg.png").convert("RGB"))
    assert array.shape[1] == 3 * 20 * 3 and array.shape[0] > TITLE_HEIGHT + 24 * 3  # + the legend
    palette = class_palette(4)
    gt_panel = array[TITLE_HEIGHT : TITLE_HEIGHT + 72, 60:120]
    pred_panel = array[TITLE_HEIGHT : TITLE_HEIGHT + 72, 120:180]
    np.testing.assert_array_equal(pred_panel, palette[pred].repeat(3, 0).repeat(3, 1))
    expected_gt = np.where((target == 255)[..., None], np.array(IGNORE_COLOR), palette[np.minimum(target, 3)])
    np.testing.assert_array_equal(gt_panel, expected_gt.repeat(3, 0).repeat(3, 1))


def test_detection_overlay_draws_confident_instances_only(tmp_path: Path) -> None:
    image = _image(40, 60)
    masks = torch.zeros(2, 1, 40, 60)
    masks[0, 0, 20:36, 30:50] = 0.9  # confident instance
    masks[1, 0, 2:12, 2:12] = 0.9  # below the score threshold
    pred = {
        "boxes": torch.tensor([[30.0, 20.0, 50.0, 36.0], [2.0, 2.0, 12.0, 12.0]]),
        "labels": torch.tensor([2, 3]),
        "scores": torch.tensor([0.9, 0.1]),
        "masks": masks,
    }
    target = {"boxes": torch.tensor([[29.0, 19.0, 51.0, 37.0]]), "labels": torch.tensor([2])}
    picture = render_detection(image, pred, target, NAMES, score_threshold=0.3, zoom=2)
    picture.save(tmp_path / "det.png")
    array = np.asarray(_png(tmp_path / "det.png").convert("RGB")).astype(int)
    assert array.shape == (TITLE_HEIGHT + 80, 2 * 120, 3)
    plain = np.asarray(Image.fromarray(image).resize((120, 80), Image.BICUBIC)).astype(int)
    panel = array[TITLE_HEIGHT:, :120]
    np.testing.assert_array_equal(panel[6:22, 6:22], plain[6:22, 6:22])  # the low-score instance is not drawn
    tinted = (0.5 * plain[56, 80] + 0.5 * class_palette(5)[2]).round()
    np.testing.assert_allclose(panel[56, 80], tinted, atol=1)  # inside the confident mask, away from its box


def test_classification_strip_has_one_tile_per_image() -> None:
    images = [_image(16, 16, s) for s in range(3)]
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])
    picture = render_classification(images, probs, [0, 2, 2], NAMES)
    zoom = 8  # tiles are upscaled to >= 128 pixels
    assert picture.size[0] == 3 * 16 * zoom and picture.size[1] > TITLE_HEIGHT + 16 * zoom


def _write_metrics(run_dir: Path) -> None:
    logger = CSVLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="")
    for step in range(1, 41):
        logger.log_metrics({"train/loss": 2.0 / step, "train/lr": 1e-3 * step / 40, "epoch": step // 10}, step=step)
        if step % 10 == 0:
            logger.log_metrics({"val/loss": 1.0 / step, "val/top1": step / 40, "epoch": step // 10}, step=step)
    logger.save()


def test_training_curves_from_metrics_csv(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert plot_training_curves(run) is None  # no metrics.csv yet
    _write_metrics(run)
    series = read_metrics(run / "metrics.csv")
    assert [s for s, _ in series["val/top1"]] == [10, 20, 30, 40] and len(series["train/loss"]) == 40
    assert series["val/top1"][-1] == (40, 1.0)
    path = plot_training_curves(run)
    assert path == run / "curves.png"
    assert _png(path).size == (1260, 300)  # three panels (loss, learning rate, val) of 4.2 x 3.0 inches at 100 dpi


def test_log_images_reaches_wandb_and_tensorboard(tmp_path: Path) -> None:
    class RecordingWandb(WandbLogger):
        def __init__(self) -> None:  # NOTE: no wandb run; only the logging call is recorded
            self.calls = []

        def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
            self.calls.append((key, [image.shape for image in images], step))

    wandb = RecordingWandb()
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version="")
    pictures = [Image.fromarray(_image(10, 12)), Image.fromarray(_image(10, 12, 1))]
    trainer = SimpleNamespace(loggers=[CSVLogger(str(tmp_path)), wandb, tensorboard], global_step=7)
    log_images(trainer, "val/predictions", pictures)
    tensorboard.experiment.flush()
    assert wandb.calls == [("val/predictions", [(10, 12, 3), (10, 12, 3)], 7)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val/predictions/0", "val/predictions/1"]


def test_validation_callback_draws_the_first_images_each_epoch(tmp_path: Path, tiny_imagenet: Path) -> None:
    import lightning.pytorch as L

    from datamodules.imagenet import ImageNetDataModule
    from tasks.classification import ClassificationTask

    data = ImageNetDataModule(
        root=str(tiny_imagenet), img_size=32, crop_pct=1.0, batch_size=4, num_workers=0, persistent_workers=False
    )
    task = ClassificationTask("strata_hybrid_pico", num_classes=8, ema_decay=None, warmup_epochs=0, lr_base_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""),
        callbacks=[ValidationOverlays(tmp_path / "run", num_images=6)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    folders = sorted(p.name for p in (tmp_path / "run" / "visualizations").iterdir())
    assert folders == ["epoch000", "epoch001"]  # none for the sanity check
    first = sorted(p.name for p in (tmp_path / "run" / "visualizations" / "epoch000").iterdir())
    assert first == ["val_0.png", "val_1.png"]  # batches of 4: one strip of 4 tiles, then one of 2
    assert _png(tmp_path / "run" / "visualizations" / "epoch000" / "val_1.png").size[0] == 2 * 32 * 4


def test_segmentation_validation_overlays_at_the_original_size() -> None:
    from tasks.segmentation import SegmentationTask

    torch.manual_seed(0)
    info = {"class_names": NAMES, "mean": MEAN, "std": STD}
    task = SegmentationTask("strata_hybrid_pico", num_classes=4, head="semfpn", head_channels=16, dataset_info=info)
    task.eval()
    images = torch.randn(2, 3, 64, 64)
    masks = [torch.randint(0, 4, (48, 40)), torch.randint(0, 4, (48, 40))]
    pictures = task.render_predictions((images, masks, [{}, {}]), limit=1)
    assert len(pictures) == 1 and pictures[0].size[0] == 3 * 40 * default_zoom(48, 40)


def test_predict_writers_draw_overlays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seg_writer = SegmentationPredictionWriter(tmp_path, max_overlays=1)
    trainer = SimpleNamespace(is_global_zero=True)
    info = {"class_names": NAMES, "mean": MEAN, "std": STD, "category_ids": [11, 12, 13, 14]}
    module = SimpleNamespace(hparams={"num_classes": 4, "ignore_index": 255}, dataset_info=info)
    preds = [torch.from_numpy(rng.integers(0, 4, (30, 20))) for _ in range(2)]
    batch = (torch.randn(2, 3, 32, 32), [p.clone() for p in preds], [{}, {}])
    seg_writer.write_on_batch_end(trainer, module, {"preds": preds, "names": ["a", "b"]}, None, batch, 0)
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.png")) == ["a.png", "b.png"]
    assert [p.name for p in (tmp_path / "predictions" / "overlays").iterdir()] == ["a.png"]
    assert _png(tmp_path / "predictions" / "overlays" / "a.png").size[0] == 3 * 20 * default_zoom(30, 20)

    coco_writer = CocoPredictionWriter(tmp_path / "det")
    detection = {
        "boxes": torch.tensor([[4.0, 4.0, 20.0, 16.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.8]),
        "masks": torch.ones(1, 1, 24, 32),
    }
    records = detections_to_coco(detection, 5, [11, 12, 13, 14])
    target = {"image_id": 5, "orig_size": (24, 32), "scale": (0.5, 0.5), "boxes": torch.tensor([[2.0, 2.0, 10.0, 8.0]])}
    target["labels"] = torch.tensor([2])
    coco_writer.write_on_batch_end(
        trainer, module, {"records": records, "image_ids": [5]}, None, ([torch.rand(3, 12, 16)], [target]), 0
    )
    overlay = tmp_path / "det" / "predictions" / "overlays" / "5.png"
    assert _png(overlay).size == (2 * 32 * default_zoom(24, 32), TITLE_HEIGHT + 24 * default_zoom(24, 32))


def _script(name: str):
    return load_script(name)


def test_visualize_command_attention_and_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from runs.export import export_for_timm

    visualize = _script("visualize")
    image = tmp_path / "shape.png"
    Image.fromarray(_image(50, 70)).save(image)
    torch.manual_seed(0)
    export_for_timm(timm.create_model("strata_hybrid_pico", num_classes=4), tmp_path / "run", label_names=NAMES)
    _write_metrics(tmp_path / "run")
    run_args = ["--run", str(tmp_path / "run"), "--image", str(image), "--views", "routing"]
    visualize.main(["attention", *run_args, "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    assert "predicted: " in printed and any(name in printed for name in NAMES)
    assert _png(tmp_path / "a" / "routing_stages_2_blocks_0_attn.png").size[0] == 64 * 4  # default size: 64x64
    weights = tmp_path / "run" / "model.safetensors"
    args = [
        "--image",
        str(image),
        "--size",
        "48x80",
        "--query",
        "70,5",
        "--views",
        "routing",
        "--out",
        str(tmp_path / "b"),
    ]
    visualize.main(["attention", "--model", "strata_hybrid_pico", "--weights", str(weights), *args])
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["routing_stages_2_blocks_0_attn.png"]
    assert _png(tmp_path / "b" / "routing_stages_2_blocks_0_attn.png").size == (80 * 4, 48 * 4 + 20)
    visualize.main(["curves", "--run", str(tmp_path / "run")])
    assert _png(tmp_path / "run" / "curves.png").size == (1260, 300)
    with pytest.raises(SystemExit):
        visualize.main(["attention", "--model", "x", "--run", "y", "--image", str(image), "--out", str(tmp_path)])


def test_benchmark_capture_script_reports_identical_outputs(capsys: pytest.CaptureFixture) -> None:
    result = _script("benchmark_capture").main(["--size", "32", "--batch", "1", "--repeats", "2", "--warmup", "0"])
    assert result["identical"] == 1.0 and result["ratio_off"] > 0
    assert "off / never" in capsys.readouterr().out


def test_metrics_csv_with_only_blank_cells_gives_no_picture(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([["epoch", "step", "train/loss"], ["0", "9", ""]])
    assert plot_training_curves(run) is None
