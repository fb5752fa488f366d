"""ADE20K datamodule: pairing, label reduction, mmseg's train pipeline (alignment, cat_max_ratio, padding), eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from core.errors import DataError
from datamodules.ade20k import (
    ADE20KDataModule,
    CatMaxRatioCrop,
    PhotoMetricDistortion,
    build_segmentation_transform,
    reduce_zero_label,
)

NUM_CLASSES = 5
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# NOTE: colour of label value v (0 = "other"); far apart so a misaligned or blended pixel cannot pass
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=np.uint8)


def _block_scene(rng: np.random.Generator, height: int, width: int, block: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Label map of random ``block``-pixel squares (values 0..K) and the image painting value v in ``PALETTE[v]``."""
    grid = rng.integers(0, NUM_CLASSES + 1, size=(-(-height // block), -(-width // block)))
    label = np.kron(grid, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    return PALETTE[label], label


def _write_pair(root: Path, folder: str, name: str, image: np.ndarray, label: np.ndarray, ext: str = ".png") -> None:
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / folder / f"{name}{ext}")
    Image.fromarray(label, mode="L").save(root / "annotations" / folder / f"{name}.png")


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    """6 train (96x64) and 3 val images of different sizes, lossless, plus a class-name file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ade"
    for i in range(6):
        _write_pair(root, "training", f"train_{i}", *_block_scene(rng, 64, 96))
    for i, (h, w) in enumerate([(60, 90), (90, 60), (48, 48)]):
        _write_pair(root, "validation", f"val_{i}", *_block_scene(rng, h, w))
    (root / "class_names.txt").write_text("".join(f"shape {i}\n" for i in range(NUM_CLASSES)))
    return root


def _datamodule(root: Path, **kwargs) -> ADE20KDataModule:
    args = dict(num_classes=NUM_CLASSES, crop_size=48, scale=(128, 64), eval_short_side=40, batch_size=2, num_workers=0)
    return ADE20KDataModule(str(root), **{**args, **kwargs})


def _unnormalize(image: np.ndarray) -> np.ndarray:
    return (image * STD + MEAN) * 255.0


def test_reduce_zero_label_maps_other_to_ignore_and_shifts_classes() -> None:
    label = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(label), [[255, 0, 1], [149, 255, 6]])


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_image_and_mask_aligned(seed: int) -> None:
    image, label = _block_scene(np.random.default_rng(100 + seed), 70, 110, block=16)
    transform = build_segmentation_transform(
        train=True, crop_size=48, scale=(128, 64), ratio_range=(0.5, 2.0), hflip=0.5, photometric=False
    )
    transform.set_random_seed(seed)
    out = transform(image=image, mask=reduce_zero_label(label))
    mask, colours = out["mask"], _unnormalize(out["image"])
    assert mask.shape == (48, 48) and colours.shape == (48, 48, 3)
    # NOTE: compare only 2+ pixels away from block and image edges: OpenCV's nearest (mask) samples up to ~1.5 source
    # pixels away from its bilinear (image), as in mmseg
    window = sliding_window_view(np.pad(mask, 2, constant_values=254), (5, 5))
    interior = (window == mask[..., None, None]).all(axis=(-1, -2)) & (mask != 255)
    assert interior.sum() > 0.1 * mask.size  # not vacuous
    expected = PALETTE[mask[interior].astype(np.int64) + 1]
    np.testing.assert_allclose(colours[interior], expected, atol=2.0)


def test_flip_moves_image_and_mask_together() -> None:
    image, label = _block_scene(np.random.default_rng(7), 48, 48)
    transform = build_segmentation_transform(
        train=True, crop_size=48, scale=(48, 48), ratio_range=(1.0, 1.0), hflip=1.0, photometric=False
    )
    out = transform(image=image, mask=reduce_zero_label(label))
    np.testing.assert_array_equal(out["mask"], reduce_zero_label(label)[:, ::-1])
    np.testing.assert_allclose(_unnormalize(out["image"]), image[:, ::-1].astype(np.float32), atol=1e-3)


def _balanced(mask: np.ndarray, cat_max_ratio: float) -> bool:
    _, counts = np.unique(mask[mask != 255], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def test_cat_max_ratio_retries_until_no_class_dominates() -> None:
    # class 1 on the left 24 columns, class 0 elsewhere: ~45% of 32x32 windows are balanced at 0.75
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :24] = 1
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    rates = {}
    for ratio in (0.75, 1.0):
        crop = CatMaxRatioCrop(32, 32, cat_max_ratio=ratio)
        crop.set_random_seed(0)
        outs = [crop(image=image, mask=mask)["mask"] for _ in range(60)]
        assert all(out.shape == (32, 32) for out in outs)
        rates[ratio] = np.mean([_balanced(out, 0.75) for out in outs])
    assert rates[0.75] >= 0.95
    assert rates[1.0] < 0.75  # without retries the crops follow the uniform window distribution


def test_cat_max_ratio_ignores_255_and_gives_up_after_ten_tries() -> None:
    mask = np.full((64, 64), 255, dtype=np.uint8)
    mask[:, :40] = 3  # only one real class: never balanced, the last window is kept
    crop = CatMaxRatioCrop(32, 32, cat_max_ratio=0.75)
    crop.set_random_seed(0)
    out = crop(image=np.zeros((64, 64, 3), dtype=np.uint8), mask=mask)
    assert out["mask"].shape == (32, 32) and out["image"].shape == (32, 32, 3)


def test_photometric_distortion_steps_follow_mmseg() -> None:
    distort = PhotoMetricDistortion()
    image = np.array([[[200, 50, 50], [250, 10, 0], [255, 0, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(distort.apply(image, brightness=10.0), np.clip(image.astype(int) + 10, 0, 255))
    np.testing.assert_array_equal(distort.apply(image, contrast=0.5), image // 2)
    grey = distort.apply(image, saturation=0.0)
    assert (grey == grey[..., :1]).all()
    np.testing.assert_array_equal(distort.apply(image[:, 2:], hue=90), [[[0, 255, 255]]])  # red -> cyan
    distort.set_random_seed(0)
    outs = [distort(image=image)["image"] for _ in range(8)]
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outs)
    assert sum(not np.array_equal(out, image) for out in outs) >= 4


def test_small_images_are_padded_with_ignore_label_and_zero_image() -> None:
    image, label = _block_scene(np.random.default_rng(3), 30, 40, block=10)
    transform = build_segmentation_transform(
        train=True, crop_size=64, scale=(40, 30), ratio_range=(1.0, 1.0), hflip=0.0, photometric=True
    )
    out = transform(image=image, mask=reduce_zero_label(label))
    mask, padded = out["mask"], out["image"]
    assert mask.shape == (64, 64) and padded.shape == (64, 64, 3)
    np.testing.assert_array_equal(mask[:30, :40], reduce_zero_label(label))
    assert (mask[30:] == 255).all() and (mask[:, 40:] == 255).all()
    assert (padded[30:] == 0).all() and (padded[:, 40:] == 0).all()


def test_train_batches_have_the_contract_shapes_and_are_reproducible(ade_root: Path) -> None:
    dm = _datamodule(ade_root)
    batches = []
    for _ in range(2):
        torch.manual_seed(0)
        batches.append(next(iter(dm.train_dataloader())))
    (images, masks), (images2, masks2) = batches
    assert images.shape == (2, 3, 48, 48) and images.dtype == torch.float32
    assert masks.shape == (2, 48, 48) and masks.dtype == torch.int64
    values = set(masks.unique().tolist())
    assert values <= set(range(NUM_CLASSES)) | {255} and values - {255}
    assert torch.equal(images, images2) and torch.equal(masks, masks2)
    assert len(dm.train_dataloader()) == 3  # 6 images, batch 2, drop_last


def test_val_resizes_the_image_and_keeps_the_label_at_original_size(ade_root: Path) -> None:
    dm = _datamodule(ade_root)
    batches = list(dm.val_dataloader())
    assert len(batches) == 3
    for images, masks, metas in batches:
        (meta,) = metas
        h0, w0 = meta["orig_size"]
        stored = np.asarray(Image.open(ade_root / "annotations" / "validation" / f"{meta['name']}.png"))
        assert masks.shape == (1, h0, w0) and masks.dtype == torch.int64
        np.testing.assert_array_equal(masks[0].numpy(), reduce_zero_label(stored))
        # mmseg Resize((128, 40), keep_ratio): scale = min(128 / long, 40 / short)
        scale = min(128 / max(h0, w0), 40 / min(h0, w0))
        assert images.shape == (1, 3, round(h0 * scale), round(w0 * scale))
        assert min(images.shape[-2:]) == 40
    # the long bound wins for an elongated image
    _write_pair(ade_root, "validation", "val_wide", *_block_scene(np.random.default_rng(9), 20, 100))
    dm = _datamodule(ade_root, eval_short_side=64)
    dm.setup("validate")
    image, mask, meta = next(item for item in dm.val_set if item[2]["name"] == "val_wide")
    assert image.shape == (3, 26, 128) and mask.shape == (20, 100) and meta["orig_size"] == (20, 100)


def test_class_names_from_the_file_csv_or_defaults(ade_root: Path) -> None:
    assert _datamodule(ade_root).class_names == [f"shape {i}" for i in range(NUM_CLASSES)]
    (ade_root / "class_names.txt").unlink()
    assert _datamodule(ade_root).class_names == [f"class_{i}" for i in range(NUM_CLASSES)]
    rows = "".join(f"{i + 1},0.1,10,1,name{i};synonym\n" for i in range(NUM_CLASSES))
    (ade_root / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n" + rows)
    dm = _datamodule(ade_root)
    assert dm.class_names == [f"name{i}" for i in range(NUM_CLASSES)]
    assert dm.num_classes == NUM_CLASSES and dm.ignore_index == 255


def test_class_count_mismatch_names_the_file_and_the_fix(ade_root: Path) -> None:
    with pytest.raises(DataError, match=r"class_names\.txt names 5 classes.*num_classes 5"):
        _datamodule(ade_root, num_classes=150)
    with pytest.raises(DataError, match="does not exist"):
        _datamodule(ade_root, class_names_file="nope.txt")


def test_missing_folders_and_root_are_data_errors(ade_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _datamodule(tmp_path / "absent")
    for path in (ade_root / "annotations" / "validation").iterdir():
        path.unlink()
    (ade_root / "annotations" / "validation").rmdir()
    dm = _datamodule(ade_root)
    with pytest.raises(DataError, match=r"missing folder .*annotations/validation"):
        dm.setup("validate")


def test_unpaired_files_are_counted_skipped_or_refused(ade_root: Path) -> None:
    image, label = _block_scene(np.random.default_rng(5), 32, 32)
    Image.fromarray(label).save(ade_root / "annotations" / "validation" / "orphan.png")
    dm = _datamodule(ade_root)
    dm.setup("validate")  # a mask without its image is counted and skipped
    assert dm.counts["val"] == {"pairs": 3, "missing_annotations": 0, "missing_images": 1}
    Image.fromarray(image).save(ade_root / "images" / "validation" / "lonely.jpg")
    with pytest.raises(DataError, match=r"missing annotation .*annotations/validation/lonely.png"):
        _datamodule(ade_root).setup("validate")  # an image without its mask would train on nothing: refused
    for path in (ade_root / "annotations" / "training").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="has its annotation"):
        dm.setup("fit")


def test_eval_under_ddp_sees_each_image_once(ade_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    names = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        names += [meta["name"] for _, _, metas in _datamodule(ade_root).val_dataloader() for meta in metas]
    assert sorted(names) == ["val_0", "val_1", "val_2"]
