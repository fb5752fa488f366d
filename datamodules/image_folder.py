"""Class-folder image datasets (``split/<class>/<image>``): discovery, validation and decoding to RGB."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from core.errors import DataError

from .decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeError,
    ExcludedSample,
    ExcludedSamples,
    SkipCounter,
    check_max_image_pixels,
    check_undecodable_policy,
    decode_or_exclude,
    decode_or_replace,
    decode_rgb,
    decode_rgb_image,
    split_excluded,
)

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "collate_classification_excluding",
    "decode_rgb",
    "find_classes",
    "is_not_data",
    "read_class_names",
    "scan_image_folder",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_OS_METADATA_FOLDERS = frozenset({"__MACOSX"})


def is_not_data(name: str) -> bool:
    """Whether a file or folder name is operating-system metadata, never a sample or a class: hidden names (macOS's
    ``._<name>`` AppleDouble files that archives and copies to non-HFS disks create beside every image, ``.DS_Store``)
    and the ``__MACOSX/`` folder of zips made on macOS."""
    return name.startswith(".") or name in _OS_METADATA_FOLDERS


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of ``split_dir``; the class index is the position in this list."""
    if not split_dir.is_dir():
        raise DataError(
            f"missing folder {split_dir}: expected {split_dir}/<class>/<image> "
            "(check that --data.init_args.root points at the dataset)"
        )
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not is_not_data(entry.name))
    if not classes:
        raise DataError(f"no class folders in {split_dir}: expected {split_dir}/<class>/<image>")
    return classes


def scan_image_folder(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """All (path, class index) pairs under ``split_dir``; an empty class folder is an error, never a silent skip."""
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(
            entry.path
            for entry in os.scandir(class_dir)
            if entry.is_file()
            and not is_not_data(entry.name)
            and os.path.splitext(entry.name)[1].lower() in IMG_EXTENSIONS
        )
        if not files:
            raise DataError(f"empty class folder {class_dir}: add its images or remove the folder")
        samples.extend((path, index) for path in files)
    return samples


def read_class_names(path: Path, classes: Sequence[str]) -> list[str]:
    """Human-readable class names from ``path``.

    Two formats: one name per line in class-index order, or ImageNet's ``LOC_synset_mapping.txt`` style
    ``<folder> <name>`` lines matched by folder name.
    """
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    by_folder = dict(line.split(maxsplit=1) for line in lines if len(line.split(maxsplit=1)) == 2)
    if all(name in by_folder for name in classes):
        return [by_folder[name] for name in classes]
    if len(lines) != len(classes):
        raise DataError(
            f"class-name file {path} has {len(lines)} lines for {len(classes)} class folders: "
            "give one name per class (in folder order) or '<folder> <name>' lines"
        )
    return lines


class ImageFolderDataset(Dataset):
    """(path, label) samples decoded to RGB PIL images (``datamodules.decode.decode_rgb_image``) and passed through a
    transform called as ``transform(image=pil_image)["image"]`` (``datamodules.classification_transforms``).

    Returns ``(image CHW float tensor, label)``, the image upright (its EXIF orientation applied). A file that fails to
    decode (or vanished since the scan, or has more than ``max_image_pixels`` pixels) is handled by ``undecodable``:
    ``"replace"`` (training) logs it, counts it in ``skip_counter`` and returns the next decodable sample with that
    sample's own label; ``"error"`` raises a one-line ``DataError`` naming the file; ``"exclude"`` returns an
    ``ExcludedSample`` (key: the index) that ``collate_classification_excluding`` drops from the batch.

    Args:
        samples: (path, class index) pairs.
        transform: a seeded transform (``SeededTimmTransform``) returning a tensor ``image``.
        undecodable: ``"replace"`` (training), ``"error"`` or ``"exclude"`` (evaluation, never substituted).
        max_image_pixels: images with more pixels are undecodable (read from the header, never decoded); None or 0:
            no limit.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable,
        undecodable: str = "replace",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        self.undecodable = check_undecodable_policy(undecodable)
        self.skip_counter = SkipCounter() if undecodable == "replace" else None

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = decode_rgb_image(path, self.max_image_pixels)
        except FileNotFoundError:
            raise DecodeError(f"{path}: the file disappeared after the dataset was scanned") from None
        return self.transform(image=image)["image"], label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | ExcludedSample:
        if self.skip_counter is not None:
            return decode_or_replace(self._load, index, len(self.samples), self.skip_counter)
        return decode_or_exclude(self._load, index, index, self.undecodable)

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random generators (the transform keeps its own, which forked workers share)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)


def collate_classification_excluding(
    samples: Sequence[tuple[torch.Tensor, int] | ExcludedSample],
) -> tuple[torch.Tensor, torch.Tensor, ExcludedSamples]:
    """The evaluation batches under ``eval_undecodable="exclude"``: ``(images (B, 3, H, W), labels (B,), excluded)``
    of the decoded samples (``B`` is 0 when none decoded) and the excluded ones."""
    kept, excluded = split_excluded(samples)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), excluded
    images, labels = zip(*kept, strict=True)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64), excluded
