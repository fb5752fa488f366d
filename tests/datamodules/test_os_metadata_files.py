"""Operating-system metadata in a dataset folder is never data: macOS's ``._<name>`` AppleDouble companions (what
copying or unzipping on macOS leaves beside every image), hidden files, and a zip's ``__MACOSX/`` folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import albumentations as A

from datamodules.ade20k import ADE20KDataset
from datamodules.image_folder import find_classes, is_not_data, scan_image_folder

APPLEDOUBLE = b"\x00\x05\x16\x07" + bytes(78)  # the header macOS writes; not an image


def test_names_that_are_never_data() -> None:
    assert all(is_not_data(name) for name in ("._n01440764_10026.JPEG", ".DS_Store", "__MACOSX"))
    assert not any(is_not_data(name) for name in ("n01440764_10026.JPEG", "n01440764", "MACOSX_photos"))


def test_an_image_folder_with_macos_metadata_has_the_same_classes_and_samples(
    tiny_imagenet: Path, tmp_path: Path
) -> None:
    root = tmp_path / "imagenet"
    shutil.copytree(tiny_imagenet, root)
    split = root / "train"
    classes, samples = find_classes(split), scan_image_folder(split, find_classes(split))
    for path, _ in samples:
        Path(path).with_name(f"._{Path(path).name}").write_bytes(APPLEDOUBLE)
    (split / "__MACOSX" / classes[0]).mkdir(parents=True)
    (split / "__MACOSX" / classes[0] / f"._{Path(samples[0][0]).name}").write_bytes(APPLEDOUBLE)
    (split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert find_classes(split) == classes  # no "__MACOSX" class
    assert scan_image_folder(split, classes) == samples  # no "._*" sample to fail decoding or to be skipped


def test_an_ade20k_split_with_macos_companions_loads_every_pair(tiny_ade20k: Path, tmp_path: Path) -> None:
    root = tmp_path / "ade"
    shutil.copytree(tiny_ade20k, root)
    images, masks = root / "images" / "validation", root / "annotations" / "validation"
    before = ADE20KDataset(images, masks, A.Compose([]), train=False).samples
    for folder in (images, masks):
        for path in list(folder.iterdir()):
            path.with_name(f"._{path.name}").write_bytes(APPLEDOUBLE)  # a "._x.jpg" without "._x.png" would fail
    after = ADE20KDataset(images, masks, A.Compose([]), train=False).samples
    assert after == before and len(after) > 0
