"""ImageNet-layout datamodule: discovery, class names, transforms, errors, distributed sampling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError, DataError
from datamodules.classification_transforms import SeededTimmTransform, build_eval_transform, build_train_transform
from datamodules.imagenet import ImageNetDataModule
from datamodules.samplers import UnpaddedDistributedSampler
from datamodules.shapes import SHAPE_CLASSES


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_discovery_indexes_sorted_folders_and_reads_names(tiny_imagenet: Path) -> None:
    dm = ImageNetDataModule(root=str(tiny_imagenet), img_size=32, batch_size=4, num_workers=0)
    assert dm.classes == sorted(SHAPE_CLASSES)
    assert dm.num_classes == len(SHAPE_CLASSES)
    # class_names.txt lists names in sorted-folder order, one per line
    assert dm.class_names == dm.classes
    dm.setup("fit")
    assert len(dm.train_set) == 8 * 8 and len(dm.val_set) == 8 * 4
    for path, label in dm.train_set.samples:
        assert Path(path).parent.name == dm.classes[label]


def test_synset_mapping_class_names(tiny_imagenet: Path, tmp_path: Path) -> None:
    names = tmp_path / "synsets.txt"
    names.write_text("".join(f"{c} a {c.upper()}\n" for c in reversed(sorted(SHAPE_CLASSES))))
    dm = ImageNetDataModule(root=str(tiny_imagenet), class_names_file=str(names), num_workers=0)
    assert dm.class_names == [f"a {c.upper()}" for c in dm.classes]


def test_train_transform_shapes_and_ranges() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = build_train_transform(24, rand_augment="rand-m9-mstd0.5-inc1", mean=mean, std=std)
    for _ in range(20):
        out = train(image=image)["image"]
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        assert out.min() >= (0 - 0.5) / 0.25 - 1e-5 and out.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_eval_transform_is_resize_then_centre_crop() -> None:
    # a 40x80 image whose columns encode their x position: centre crop keeps the middle columns
    image = np.repeat(np.repeat(np.arange(80, dtype=np.uint8)[None, :, None], 40, axis=0), 3, axis=2)
    out = build_eval_transform(20, crop_pct=0.5, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))(image=image)
    img = out["image"]
    assert img.shape == (3, 20, 20)
    # short side 40 -> 40 (20 / 0.5); width stays 80; the centre 20 columns are 30..49
    cols = (img[0, 0] * 255).round().long()
    assert cols.tolist() == list(range(30, 50))


def test_transform_options_reach_timms_pipeline(tiny_imagenet: Path) -> None:
    dm = ImageNetDataModule(
        root=str(tiny_imagenet), img_size=32, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
        random_erasing_mode="rand", random_erasing_count=2, color_jitter=0.4, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    train, val = dm.train_set.transform, dm.val_set.transform
    assert isinstance(train, SeededTimmTransform) and isinstance(val, SeededTimmTransform)
    erasing = train.transform.transforms[-1]
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "rand", 2)
    assert [op.name for op in train.rand_augment.ops][4] == "PosterizeIncreasing"
    # NOTE: timm leaves colour jitter out when RandAugment is on
    assert "ColorJitter" not in repr(train.transform) and val.rand_augment is None


def test_bad_rand_augment_spec_fails_at_construction(tiny_imagenet: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.rand_augment 'rand-m9-w0': 'w0': .*'-tweights'"):
        ImageNetDataModule(root=str(tiny_imagenet), rand_augment="rand-m9-w0")


def test_loaders_batch_and_drop_last(tiny_imagenet: Path) -> None:
    dm = ImageNetDataModule(root=str(tiny_imagenet), img_size=32, batch_size=10, num_workers=0)
    dm.setup("fit")
    train_batches = list(dm.train_dataloader())
    assert all(images.shape == (10, 3, 32, 32) for images, _ in train_batches)
    assert len(train_batches) == 64 // 10  # the ragged last batch is dropped
    val_count = sum(len(labels) for _, labels in dm.val_dataloader())
    assert val_count == 32


def test_missing_split_names_the_folder(tiny_imagenet: Path, tmp_path: Path) -> None:
    root = _copy(tiny_imagenet, tmp_path / "ds")
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=r"missing folder .*ds/val"):
        ImageNetDataModule(root=str(root))


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        ImageNetDataModule(root=str(tmp_path / "nowhere"))


def test_empty_class_folder_is_named(tiny_imagenet: Path, tmp_path: Path) -> None:
    root = _copy(tiny_imagenet, tmp_path / "ds")
    for f in (root / "train" / "star").iterdir():
        f.unlink()
    dm = ImageNetDataModule(root=str(root), num_workers=0)
    with pytest.raises(DataError, match=r"empty class folder .*train/star"):
        dm.setup("fit")


def test_train_val_class_mismatch(tiny_imagenet: Path, tmp_path: Path) -> None:
    root = _copy(tiny_imagenet, tmp_path / "ds")
    shutil.rmtree(root / "val" / "ring")
    with pytest.raises(DataError, match=r"only in train: \['ring'\]"):
        ImageNetDataModule(root=str(root))


@pytest.mark.parametrize(("size", "world"), [(10, 3), (7, 2), (4, 4)])
def test_unpadded_sampler_sees_every_sample_once(size: int, world: int) -> None:
    dataset = list(range(size))
    seen = [i for rank in range(world) for i in UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank)]
    assert sorted(seen) == dataset
    assert sum(len(UnpaddedDistributedSampler(dataset, num_replicas=world, rank=r)) for r in range(world)) == size
