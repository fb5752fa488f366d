"""ADE20K-layout semantic-segmentation data (ADEChallengeData2016) with mmsegmentation's standard pipeline.

Layout: ``root/images/{training,validation}/NAME.jpg`` paired with ``root/annotations/{training,validation}/NAME.png``
(single-channel, 0 = "other", ``1..K`` = classes). Training follows mmseg's ADE20K recipe (configs/_base_/datasets/
ade20k.py): keep-ratio ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0))`` -> ``RandomCrop(512,
cat_max_ratio=0.75)`` -> flip -> ``PhotoMetricDistortion`` -> normalise -> pad to the crop (image 0 after
normalisation, label 255). Evaluation resizes keep-ratio into (2048, 512) and keeps the label at its original size.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import albumentations as A
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.errors import ConfigError, DataError

from .base import StrataDataModule
from .decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeError,
    ExcludedSample,
    ExcludedSamples,
    ImageHeader,
    PixelLimitError,
    SkipCounter,
    check_eval_undecodable,
    check_max_image_pixels,
    check_skipped_fraction,
    check_undecodable_policy,
    decode_or_exclude,
    decode_or_replace,
    decode_rgb,
    open_image,
    orient_array,
    read_header,
    split_excluded,
)
from .image_folder import is_not_data
from .loaders import build_loader
from .segmentation_transforms import IGNORE_INDEX, CatMaxRatioCrop, PhotoMetricDistortion, build_segmentation_transform

__all__ = [
    "ADE20KDataModule",
    "ADE20KDataset",
    "CatMaxRatioCrop",
    "PhotoMetricDistortion",
    "build_segmentation_transform",
    "collate_segmentation_eval",
    "collate_segmentation_excluding",
    "read_ade_class_names",
    "reduce_zero_label",
]

logger = logging.getLogger(__name__)

_SPLITS = {"train": "training", "val": "validation"}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _data_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that can be data (not macOS ``._*`` companions or other hidden files)."""
    return [p for p in folder.iterdir() if p.is_file() and not is_not_data(p.name)]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: "other" (0) becomes ``255`` (ignored), class value ``v`` becomes ``v - 1``."""
    out = label.astype(np.int16) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_ade_class_names(path: Path) -> list[str]:
    """Class names in value order from a one-name-per-line file or from ADE20K's ``objectInfo150.csv``.

    The CSV's ``Name`` column lists synonyms (``building;edifice``); the first one is kept, as mmseg does.
    """
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "Name" not in rows[0]:
            raise DataError(f"{path} has no 'Name' column: use ADE20K's objectInfo150.csv or a one-name-per-line file")
        if "Idx" in rows[0]:
            rows.sort(key=lambda row: int(row["Idx"]))
        return [row["Name"].split(";")[0].strip() for row in rows]
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def collate_segmentation_eval(
    batch: Sequence[tuple[Tensor, Tensor, dict[str, Any]]],
) -> tuple[Tensor, Tensor | list[Tensor], list[dict[str, Any]]]:
    """``(images (B, 3, H, W), masks (B, h0, w0) or a list when original sizes differ, metas)``."""
    images, masks, metas = zip(*batch, strict=True)
    if len({tuple(image.shape) for image in images}) > 1:
        raise ConfigError(
            "evaluation images of one batch have different resized sizes: set --data.init_args.eval_batch_size 1"
        )
    same = len({tuple(mask.shape) for mask in masks}) == 1
    return torch.stack(images), torch.stack(masks) if same else list(masks), list(metas)


def collate_segmentation_excluding(
    batch: Sequence[tuple[Tensor, Tensor, dict[str, Any]] | ExcludedSample],
) -> tuple[Tensor, Tensor | list[Tensor], list[dict[str, Any]], ExcludedSamples]:
    """The evaluation batches under ``eval_undecodable="exclude"``: ``collate_segmentation_eval`` of the decoded
    samples (``B`` is 0 when none decoded) and the excluded ones (key: the name) as a fourth element."""
    kept, excluded = split_excluded(batch)
    if not kept:
        return torch.empty(0), [], [], excluded
    return *collate_segmentation_eval(kept), excluded


class _MaskCheck(NamedTuple):
    """What ``ADE20KDataset._check_annotations`` found for one pair: a problem, else the EXIF orientation its mask
    is given (1: none) and, for a mode P mask, its palette ``(n, 3)`` and the indices it uses."""

    problem: str | None = None
    orientation: int = 1
    palette: np.ndarray | None = None
    used: np.ndarray | None = None


def _mask_orientation(header: ImageHeader, mask_size: tuple[int, int]) -> int | None:
    """The orientation to give a ``mask_size`` (w, h) mask so that it matches its image, decoded upright: 1 when it
    has the upright size, the image's when it has the stored size of an image whose orientation swaps its sides
    (drawn on the stored pixels), None when it has neither."""
    if header.oriented_size == mask_size:
        return 1
    if (header.width, header.height) == mask_size:
        return header.orientation
    return None


def _palettes_differ(first: np.ndarray, palette: np.ndarray, used: np.ndarray) -> bool:
    """Whether two ``(n, 3)`` palettes give different colours to any of the ``used`` indices both define."""
    shared = used[(used < len(first)) & (used < len(palette))]
    return not np.array_equal(first[shared], palette[shared])


class ADE20KDataset(Dataset):
    """One split of an ADE20K-layout dataset (Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017).

    Pairs ``image_dir/NAME.jpg`` with ``annotation_dir/NAME.png``. Checked when the dataset is built, each a one-line
    ``DataError`` naming the file: an image without its annotation, an annotation that is not a single-channel PNG,
    of another size than its image, (with ``num_classes``) holding a value above the classes (``num_classes`` with
    ``reduce_zero_label``, else ``num_classes - 1``; 255 is always the ignore value), or of mode P with another
    palette than the split's first P mask over the indices it uses (a mask re-saved with colours: its indices may
    not be class ids). Annotations without an image are counted (``counts``) and left out. An image that fails to
    decode (or has more than ``max_image_pixels`` pixels) is handled by ``undecodable`` (``datamodules/decode.py``):
    counted in ``skip_counter`` and replaced in training, a one-line ``DataError`` or an ``ExcludedSample`` keyed by
    its name in evaluation. Labels are reduced (``reduce_zero_label``) before any transform, so padding and "other"
    share the ignore value 255.

    Images are decoded upright (their EXIF orientation applied). A mask of the upright size is used as it is; a mask
    of the stored size of an image whose orientation swaps its sides was drawn on the stored pixels and is oriented
    with the image; any other size is the size error above.

    Train items: ``(image (3, S, S) float32, mask (S, S) int64)``. Eval items: ``(image (3, H, W) float32, mask
    (h0, w0) int64 at the original size, meta)`` with meta ``name`` (stem), ``orig_size`` ``(h0, w0)``,
    ``img_size`` ``(H, W)`` and ``scale`` ``(H / h0, W / w0)``.

    Args:
        image_dir: the split's image folder.
        annotation_dir: the split's label-map folder.
        transform: a pipeline from ``build_segmentation_transform``.
        train: transform image and mask together (else the image only, and return a meta).
        reduce_zero_label: map 0 to 255 and ``v`` to ``v - 1``.
        num_classes: check that no annotation holds a value above the classes (None: no value check).
        undecodable: ``"replace"`` (training), ``"error"`` or ``"exclude"`` (evaluation, never substituted).
        max_image_pixels: images with more pixels are undecodable (read from the header, never decoded); None or 0:
            no limit.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_dir: str | Path,
        transform: A.Compose,
        *,
        train: bool,
        reduce_zero_label: bool = True,
        num_classes: int | None = None,
        undecodable: str = "replace",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_dir = Path(annotation_dir)
        for folder in (self.image_dir, self.annotation_dir):
            if not folder.is_dir():
                raise DataError(
                    f"missing folder {folder}: expected ROOT/images/<split>/*.jpg and ROOT/annotations/<split>/*.png "
                    "(check --data.init_args.root)"
                )
        self.transform = transform
        self.train = train
        self.reduce_zero_label = reduce_zero_label
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        images = {p.stem: p for p in _data_files(self.image_dir) if p.suffix.lower() in _IMAGE_EXTENSIONS}
        labels = {p.stem: p for p in _data_files(self.annotation_dir) if p.suffix.lower() == ".png"}
        self.samples = [(images[stem], labels[stem]) for stem in sorted(images.keys() & labels.keys())]
        self.missing_annotations = len(images.keys() - labels.keys())
        self.missing_images = len(labels.keys() - images.keys())
        if not self.samples:
            raise DataError(
                f"no image in {self.image_dir} has its annotation (NAME.png) in {self.annotation_dir}: "
                "check the dataset layout"
            )
        if self.missing_annotations:
            stem = sorted(images.keys() - labels.keys())[0]
            raise DataError(
                f"missing annotation {self.annotation_dir / (stem + '.png')} for {images[stem]} "
                f"({self.missing_annotations} images have none): restore the masks or remove those images"
            )
        max_label = None if num_classes is None else (num_classes if reduce_zero_label else num_classes - 1)
        self.mask_orientations = self._check_annotations(max_label)
        self.undecodable = check_undecodable_policy(undecodable)
        self.skip_counter = SkipCounter() if undecodable == "replace" else None

    def _check_annotations(self, max_label: int | None) -> list[int]:
        """Read every annotation (threads: PNG decoding releases the GIL) and each image's header; raise on the first
        annotation of the wrong mode, size, values or palette. Returns the orientation each mask is given."""

        def check(pair: tuple[Path, Path]) -> _MaskCheck:
            image_path, label_path = pair
            try:
                header: ImageHeader | None = read_header(image_path, self.max_image_pixels)
            except (DecodeError, FileNotFoundError):
                header = None  # NOTE: an undecodable or oversized image is found when it is loaded (``undecodable``)
            try:
                with open_image(label_path, self.max_image_pixels) as f:
                    mode, size = f.mode, f.size
                    if mode not in ("L", "P"):
                        return _MaskCheck(
                            f"annotation {label_path} is a {mode} image: save it as a single-channel 8-bit (mode L or "
                            "P) PNG"
                        )
                    orientation = 1
                    if header is not None and (orientation := _mask_orientation(header, size)) is None:
                        upright = "" if header.oriented_size == (header.width, header.height) else " ({}x{} upright)"
                        return _MaskCheck(
                            f"annotation {label_path} is {size[0]}x{size[1]} but {image_path} is "
                            f"{header.width}x{header.height}{upright.format(*header.oriented_size)}: an annotation "
                            "must match its image"
                        )
                    label = np.asarray(f)
                    palette = f.getpalette() if mode == "P" else None
            except PixelLimitError as error:
                if header is None:
                    return _MaskCheck()  # NOTE: its image is over the limit too: the pair is left to ``undecodable``
                return _MaskCheck(f"annotation {error}")
            except DecodeError as error:
                return _MaskCheck(f"annotation {error}: restore the file")
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                return _MaskCheck(
                    f"annotation {label_path} does not decode ({type(error).__name__}: {error}): restore the file"
                )
            values = np.unique(label) if max_label is not None or palette is not None else None
            if max_label is not None:
                bad = values[(values > max_label) & (values != IGNORE_INDEX)]
                if len(bad):
                    return _MaskCheck(
                        f"annotation {label_path} holds label {int(bad.max())}, above the {max_label} of "
                        f"data.num_classes: fix the mask or set --data.init_args.num_classes"
                    )
            if palette is None:
                return _MaskCheck(orientation=orientation)
            return _MaskCheck(orientation=orientation, palette=np.asarray(palette).reshape(-1, 3), used=values)

        orientations = []
        first_palette: tuple[Path, np.ndarray] | None = None
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            for (_, label_path), found in zip(self.samples, pool.map(check, self.samples), strict=True):
                if found.problem is not None:
                    raise DataError(found.problem)
                if found.palette is not None:
                    if first_palette is None:
                        first_palette = (label_path, found.palette)
                    elif _palettes_differ(first_palette[1], found.palette, found.used):
                        raise DataError(
                            f"annotation {label_path} has another palette than {first_palette[0]} over the indices it "
                            "uses (re-saved colour masks? their indices may not be class ids): re-save it as a mode L "
                            "PNG of class indices"
                        )
                orientations.append(found.orientation)
        return orientations

    @property
    def counts(self) -> dict[str, int]:
        return {
            "pairs": len(self.samples),
            "missing_annotations": self.missing_annotations,
            "missing_images": self.missing_images,
        }

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.samples[index]
        try:
            image = decode_rgb(str(image_path), self.max_image_pixels)
        except FileNotFoundError:
            raise DecodeError(f"{image_path}: the file disappeared after the dataset was scanned") from None
        with open_image(label_path, self.max_image_pixels) as f:
            label = np.asarray(f)
        if label.ndim != 2:
            raise DataError(f"{label_path} is not a single-channel label map: save it as an 8-bit (mode L or P) PNG")
        label = orient_array(label, self.mask_orientations[index])
        if label.shape != image.shape[:2]:
            raise DecodeError(
                f"{image_path} decodes to {image.shape[1]}x{image.shape[0]} but its annotation {label_path} to "
                f"{label.shape[1]}x{label.shape[0]}, unlike their headers when the dataset was built: check the files "
                "(they may have changed since)"
            )
        label = label.astype(np.uint8)
        return image, reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Any]] | ExcludedSample:
        """The sample at ``index``; an image that fails to decode is handled by the ``undecodable`` policy."""
        if self.skip_counter is not None:
            return decode_or_replace(self._sample, index, len(self.samples), self.skip_counter)
        return decode_or_exclude(self._sample, index, self.samples[index][0].stem, self.undecodable)

    def _sample(self, index: int) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Any]]:
        image, label = self._load(index)
        if self.train:
            out = self.transform(image=image, mask=label)
            return _chw(out["image"]), torch.from_numpy(np.ascontiguousarray(out["mask"])).long()
        resized = self.transform(image=image)["image"]
        h0, w0 = label.shape
        h, w = resized.shape[:2]
        meta = {
            "name": self.samples[index][0].stem,
            "orig_size": (h0, w0),
            "img_size": (h, w),
            "scale": (h / h0, w / w0),
        }
        return _chw(resized), torch.from_numpy(label).long(), meta

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random generators (albumentations keeps its own, which forked workers share)."""
        self.transform.set_random_seed(seed)


def _chw(image: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def _check_args(
    num_classes: int,
    crop_size: int,
    scale: Sequence[int],
    ratio_range: Sequence[float],
    cat_max_ratio: float,
    hflip: float,
    eval_short_side: int,
    batch_size: int,
    eval_batch_size: int,
) -> None:
    if num_classes < 1 or num_classes > IGNORE_INDEX:
        raise ConfigError(f"data.num_classes {num_classes} must be in 1..{IGNORE_INDEX} (150 for ADE20K)")
    if crop_size < 1 or eval_short_side < 1:
        raise ConfigError(f"data.crop_size {crop_size} / data.eval_short_side {eval_short_side} must be >= 1")
    if len(scale) != 2 or min(scale) < 1:
        raise ConfigError(f"data.scale {list(scale)} must be [long, short] >= 1, e.g. [2048, 512]")
    if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
        raise ConfigError(f"data.ratio_range {list(ratio_range)} must be [min, max] with 0 < min <= max")
    if not 0 < cat_max_ratio <= 1:
        raise ConfigError(f"data.cat_max_ratio {cat_max_ratio} must be in (0, 1]; 1 disables the check")
    if not 0.0 <= hflip <= 1.0:
        raise ConfigError(f"data.hflip {hflip} is a probability: use a value in [0, 1]")
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError(f"data.batch_size {batch_size} / data.eval_batch_size {eval_batch_size} must be >= 1")


class ADE20KDataModule(StrataDataModule):
    """ADE20K (ADEChallengeData2016, or any dataset in its layout) for semantic segmentation.

    Zhou et al., "Scene Parsing through ADE20K Dataset" (CVPR 2017) / "Semantic Understanding of Scenes through the
    ADE20K Dataset" (arXiv 1608.05442). Train batches: ``(images (B, 3, S, S) float32 normalised, masks (B, S, S)
    int64)`` with labels ``0..K-1`` and ``ignore_index`` 255; eval batches: ``(images, masks at the original size,
    metas)`` (see ``ADE20KDataset`` and ``collate_segmentation_eval``; under ``eval_undecodable="exclude"`` they end
    with their ``ExcludedSamples``). ``num_classes`` and ``class_names`` are set in the constructor, so the CLI can
    link them into the model. Class names come from ``class_names_file``, else ``root/class_names.txt``, else
    ``root/objectInfo150.csv``, else ``class_{i}``.

    Args:
        root: dataset folder.
        num_classes: number of classes ``K`` (label values ``1..K`` on disk).
        class_names_file: a one-name-per-line file or an ``objectInfo150.csv`` (relative to ``root`` or absolute).
        reduce_zero_label: treat value 0 as "other" (ignored) and shift the classes down by one.
        crop_size: training crop side ``S``.
        scale: (long, short) bound of the keep-ratio resize.
        ratio_range: range of the random factor on ``scale`` in training.
        cat_max_ratio: the largest share one class may take of a training crop (1 disables the retries).
        hflip: training horizontal-flip probability.
        photometric: apply ``PhotoMetricDistortion`` in training.
        eval_short_side: short bound of the evaluation resize (long bound ``max(scale)``).
        eval_size_divisor: also resize evaluation images to multiples of this (``AlignResize``, the Semantic FPN
            recipe's 32); None keeps the keep-ratio size.
        mean: normalisation mean (RGB, 0-1 scale).
        std: normalisation std.
        batch_size: training images per device.
        eval_batch_size: validation/test/predict images per device (images of a batch must share their size).
        num_workers: loader worker processes per device.
        pin_memory: pin host memory for faster host-to-device copies.
        persistent_workers: keep workers alive between epochs.
        max_skipped_fraction: stop the run when more than this fraction of the training samples fails to decode
            (each failure is logged, replaced and counted as ``skipped_samples`` in ``summary.json``). Evaluation
            images are never replaced.
        eval_undecodable: what an undecodable val/test/predict image does: ``"error"`` stops the run naming the file;
            ``"exclude"`` leaves it out of the metric (no confusion-matrix update) and of the predictions, counted
            as ``val/excluded_images`` and ``excluded_eval_images`` in ``summary.json``.
        max_image_pixels: an image with more pixels (read from its header, never decoded: a decompression bomb) is
            undecodable, handled as above; default PIL's limit; None or 0: no limit.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str = "data/ADEChallengeData2016",
        num_classes: int = 150,
        class_names_file: str | None = None,
        reduce_zero_label: bool = True,
        crop_size: int = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        eval_short_side: int = 512,
        eval_size_divisor: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        max_skipped_fraction: float = 0.001,
        eval_undecodable: str = "error",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.max_skipped_fraction = check_skipped_fraction(max_skipped_fraction)
        check_eval_undecodable(eval_undecodable)
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        if eval_size_divisor is not None and eval_size_divisor < 1:
            raise ConfigError(f"data.eval_size_divisor {eval_size_divisor} must be >= 1 (or null), e.g. 32")
        _check_args(
            num_classes,
            crop_size,
            scale,
            ratio_range,
            cat_max_ratio,
            hflip,
            eval_short_side,
            batch_size,
            eval_batch_size,
        )
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"ADE20K root {self.root} does not exist: set --data.init_args.root to the dataset folder")
        self.class_names = self._class_names(class_names_file)
        self.train_set: ADE20KDataset | None = None
        self.val_set: ADE20KDataset | None = None

    def _class_names(self, class_names_file: str | None) -> list[str]:
        if class_names_file is not None:
            path = self.root / class_names_file
            if not path.is_file():
                raise DataError(f"class-name file {path} does not exist: fix --data.init_args.class_names_file")
        else:
            found = [self.root / name for name in ("class_names.txt", "objectInfo150.csv")]
            path = next((p for p in found if p.is_file()), None)
            if path is None:
                return [f"class_{i}" for i in range(self.num_classes)]
        names = read_ade_class_names(path)
        if len(names) != self.num_classes:
            raise DataError(
                f"{path} names {len(names)} classes but data.num_classes is {self.num_classes}: "
                f"set --data.init_args.num_classes {len(names)} or fix the file"
            )
        return names

    @property
    def num_classes(self) -> int:
        return int(self.hparams.num_classes)

    def input_sizes(self) -> dict[str, int]:
        hp = self.hparams
        return {"data.crop_size": int(hp.crop_size), "data.eval_short_side": int(hp.eval_short_side)}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per built split: image/annotation pairs and the unpaired files skipped."""
        sets = {"train": self.train_set, "val": self.val_set}
        return {split: ds.counts for split, ds in sets.items() if ds is not None}

    def _dataset(self, split: str, train: bool) -> ADE20KDataset:
        hp = self.hparams
        transform = build_segmentation_transform(
            train=train,
            crop_size=hp.crop_size,
            scale=tuple(hp.scale),
            ratio_range=tuple(hp.ratio_range),
            cat_max_ratio=hp.cat_max_ratio,
            hflip=hp.hflip,
            photometric=hp.photometric,
            eval_short_side=hp.eval_short_side,
            eval_size_divisor=hp.eval_size_divisor,
            mean=tuple(hp.mean),
            std=tuple(hp.std),
        )
        folder = _SPLITS[split]
        dataset = ADE20KDataset(
            self.root / "images" / folder,
            self.root / "annotations" / folder,
            transform,
            train=train,
            reduce_zero_label=hp.reduce_zero_label,
            num_classes=self.num_classes,
            undecodable="replace" if train else hp.eval_undecodable,
            max_image_pixels=self.max_image_pixels,
        )
        c = dataset.counts
        if rank_zero_only.rank == 0:
            logger.info(
                f"ade20k {split}: {c['pairs']} image/annotation pairs ({c['missing_annotations']} images without "
                f"annotation and {c['missing_images']} annotations without image skipped)"
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train", train=True)
        if self.val_set is None:
            self.val_set = self._dataset("val", train=False)

    def _loader(self, dataset: ADE20KDataset, train: bool) -> DataLoader:
        hp = self.hparams
        options = dict(num_workers=hp.num_workers, pin_memory=hp.pin_memory, persistent_workers=hp.persistent_workers)
        if train:
            return self.train_loader(dataset, batch_size=hp.batch_size, **options)
        collate = collate_segmentation_excluding if hp.eval_undecodable == "exclude" else collate_segmentation_eval
        options.update(collate_fn=collate, name=f"val split {dataset.image_dir}")
        return build_loader(dataset, train=False, batch_size=hp.eval_batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if len(self.train_set) < self.hparams.batch_size:
            raise DataError(
                f"{self.train_set.image_dir} has {len(self.train_set)} usable images, fewer than one batch "
                f"(--data.init_args.batch_size {self.hparams.batch_size}): lower the batch size"
            )
        return self._loader(self.train_set, train=True)
