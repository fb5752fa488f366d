"""COCO-layout detection and instance-segmentation data: annotation JSON + image folders, albumentations transforms.

Layout (COCO 2017): ``root/annotations/instances_{train,val}2017.json`` and ``root/{train,val}2017/<file_name>``.
Targets follow torchvision's detection models (boxes ``xyxy`` in pixels of the transformed image, contiguous labels
``1..K``, optional ``uint8`` instance masks); images stay un-normalised because those models normalise inside.
The resize is mmdetection's ``Resize(keep_ratio=True)`` (optionally multi-scale), the optional large-scale jitter is
the one of Ghiasi et al.; COCO evaluation reads the annotation file itself (``tasks/coco_evaluation.py``), so crowd
regions never enter the targets.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from core.errors import ConfigError, DataError

from .base import StrataDataModule
from .decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeError,
    ExcludedSample,
    ExcludedSamples,
    SkipCounter,
    check_eval_undecodable,
    check_max_image_pixels,
    check_skipped_fraction,
    check_undecodable_policy,
    decode_or_exclude,
    decode_or_replace,
    decode_rgb,
    orient_array,
    orient_boxes,
    read_header,
    split_excluded,
)
from .detection_transforms import build_detection_transform
from .loaders import build_loader

__all__ = [
    "COCODataModule",
    "COCODetectionDataset",
    "collate_detection",
    "collate_detection_excluding",
    "load_coco_json",
]

logger = logging.getLogger(__name__)

Sample = tuple[Tensor, dict[str, Any]]

_REQUIRED_KEYS = ("images", "annotations", "categories")
# NOTE: mmdet's FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2)) after the LSJ crop: boxes a crop collapsed are dropped.
_MIN_TRANSFORMED_SIZE = 1e-2


def load_coco_json(path: Path, arg: str = "annotations") -> dict[str, Any]:
    """Read a COCO annotation file; a file that is not COCO instances JSON is a one-line ``DataError``."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"{path} is not valid JSON ({error}): point --data.init_args.{arg} to a COCO instances_*.json file"
        ) from None
    missing = [key for key in _REQUIRED_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise DataError(
            f"{path} is not a COCO annotation file (no {', '.join(repr(k) for k in missing)}): "
            f"point --data.init_args.{arg} to a COCO instances_*.json file"
        )
    if not data["categories"]:
        raise DataError(f"{path} lists no categories: a COCO annotation file needs its 'categories'")
    return data


def collate_detection(batch: Sequence[Sample]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Lists of images and targets: sizes differ per image and torchvision detectors batch them themselves."""
    return [image for image, _ in batch], [target for _, target in batch]


def collate_detection_excluding(
    batch: Sequence[Sample | ExcludedSample],
) -> tuple[list[Tensor], list[dict[str, Any]], ExcludedSamples]:
    """The evaluation batches under ``eval_undecodable="exclude"``: ``collate_detection`` of the decoded samples and
    the excluded ones (key: the image id) as a third element."""
    kept, excluded = split_excluded(batch)
    return *collate_detection(kept), excluded


@dataclass(frozen=True)
class _ImageRecord:
    image_id: int
    file_name: str
    height: int  # NOTE: height and width of the decoded image, the frame of boxes and masks
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy, clipped to the image
    labels: np.ndarray  # (N,) int64 in 1..K
    ann_ids: tuple[int, ...]
    orientation: int = 1  # NOTE: the EXIF orientation the annotations (drawn in the stored frame) are given
    exif: bool = True  # NOTE: False: decoded in its stored frame, as its annotations are (evaluation)


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight ``xyxy`` boxes (pixel edges) of ``(N, H, W)`` masks; an empty mask gives a zero-size box."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


class COCODetectionDataset(Dataset):
    """One split of a COCO-format dataset (Lin et al., "Microsoft COCO: Common Objects in Context", arXiv 1405.0312).

    Category ids (not contiguous) map to labels ``1..K`` in sorted-id order; crowd annotations (``iscrowd=1``) are
    left out; boxes ``[x, y, w, h]`` become ``xyxy``, are clipped to the image, and dropped (with their masks) when
    ``w`` or ``h < min_box_size``, or when a coordinate is not finite (NaN, infinite); a ``bbox`` that is not four
    numbers is a one-line ``DataError`` naming the annotation. Images left without instances are skipped when
    ``skip_empty``. Every drop is counted (``counts``). Masks decode from polygons and from compressed or uncompressed
    RLE through pycocotools. An image that fails to decode (or has more than ``max_image_pixels`` pixels) is handled
    by ``undecodable`` (``datamodules/decode.py``): replaced by the next one in training, a one-line ``DataError`` or
    an ``ExcludedSample`` keyed by its image id in evaluation.

    Images are decoded upright (their EXIF orientation applied), and each image's ``width``/``height`` in the JSON
    say which frame its annotations are drawn in, checked from the image headers when the dataset is built: the
    upright size means the annotations are used as they are; the stored size of an image whose orientation swaps
    its sides means they are drawn on the stored pixels, and are oriented with the image (``orient_annotations``;
    else the image is decoded in its stored frame, that of the JSON that COCOeval scores against); any other size
    is a one-line ``DataError`` naming the file and both sizes.

    Returns ``(image, target)``: image float32 ``(3, H, W)`` in [0, 1]; target ``boxes`` float32 ``(N, 4)``,
    ``labels`` int64 ``(N,)``, ``masks`` uint8 ``(N, H, W)`` when ``with_masks``, ``image_id``, ``orig_size``
    ``(h, w)`` of the decoded image (the JSON's, unless stored-frame annotations were oriented with it), and
    ``scale`` ``(sy, sx)`` of the resize (transformed = original * scale, before any crop).

    Args:
        annotation_file: the split's COCO JSON.
        image_dir: folder holding the split's ``file_name`` entries.
        transform: an albumentations pipeline from ``build_detection_transform`` (None: no resize, no flip).
        with_masks: decode instance masks.
        skip_empty: leave out images without a (non-crowd, non-degenerate) instance.
        min_box_size: smallest kept box side in pixels after clipping.
        category_ids: the label order to use (default: this file's sorted ids); the file must list the same ids.
        annotations: the already parsed JSON of ``annotation_file``, to avoid reading it twice.
        undecodable: ``"replace"`` (training), ``"error"`` or ``"exclude"`` (evaluation, never substituted).
        max_image_pixels: images with more pixels are undecodable (read from the header, never decoded); None or 0:
            no limit.
        orient_annotations: orient annotations drawn in an image's stored frame with the image (training); False
            decodes such an image without its EXIF orientation instead (evaluation: predictions stay in the JSON's
            frame).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        transform: A.Compose | None = None,
        *,
        with_masks: bool = False,
        skip_empty: bool = False,
        min_box_size: float = 1.0,
        category_ids: Sequence[int] | None = None,
        annotations: dict[str, Any] | None = None,
        undecodable: str = "replace",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        orient_annotations: bool = True,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.with_masks = with_masks
        self.min_box_size = float(min_box_size)
        data = annotations if annotations is not None else load_coco_json(self.annotation_file)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        file_ids = sorted(int(c["id"]) for c in data["categories"])
        self.category_ids = list(category_ids) if category_ids is not None else file_ids
        if file_ids != self.category_ids:
            raise DataError(
                f"{self.annotation_file} has category ids {file_ids[:8]}... but the other split has "
                f"{self.category_ids[:8]}...: both annotation files need the same categories"
            )
        self.label_of = {cat_id: i + 1 for i, cat_id in enumerate(self.category_ids)}
        self.crowd_annotations = self.degenerate_boxes = self.invalid_boxes = 0
        self.empty_images = self.empty_images_skipped = self.stored_frame_images = 0
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        self.orient_annotations = orient_annotations
        try:
            records = [self._record(image) for image in sorted(data["images"], key=lambda im: im["id"])]
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise DataError(
                f"{self.annotation_file}: malformed COCO entry ({type(error).__name__}: {error}): "
                "fix the annotation file"
            ) from None
        missing = [r.file_name for r in records if not (self.image_dir / r.file_name).is_file()]
        if missing:
            raise DataError(
                f"missing image {self.image_dir / missing[0]} ({len(missing)} of the {len(records)} images listed in "
                f"{self.annotation_file} are missing): restore them or remove their entries"
            )
        self.empty_images = sum(len(r.ann_ids) == 0 for r in records)
        if skip_empty:
            self.empty_images_skipped = self.empty_images
            records = [r for r in records if r.ann_ids]
        self.records = self._in_decoded_frames(records)
        self.undecodable = check_undecodable_policy(undecodable)
        self.skip_counter = SkipCounter() if undecodable == "replace" else None

    def _record(self, image: dict[str, Any]) -> _ImageRecord:
        height, width = int(image["height"]), int(image["width"])
        boxes, labels, ann_ids = [], [], []
        for ann in self.coco.imgToAnns.get(image["id"], []):
            if ann.get("iscrowd", 0):
                self.crowd_annotations += 1
                continue
            label = self.label_of.get(int(ann["category_id"]))
            if label is None:
                raise DataError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                    "which 'categories' does not list: fix the annotation file"
                )
            bbox = ann["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise DataError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has bbox {bbox!r:.60}, not four numbers "
                    "[x, y, width, height]: fix the annotation file"
                )
            x, y, w, h = (float(v) for v in bbox)
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                self.invalid_boxes += 1
                continue
            x0, x1 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
            y0, y1 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
            if x1 - x0 < self.min_box_size or y1 - y0 < self.min_box_size or x1 <= x0 or y1 <= y0:
                self.degenerate_boxes += 1
                continue
            boxes.append((x0, y0, x1, y1))
            labels.append(label)
            ann_ids.append(int(ann["id"]))
        return _ImageRecord(
            image_id=int(image["id"]),
            file_name=str(image["file_name"]),
            height=height,
            width=width,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64),
            ann_ids=tuple(ann_ids),
        )

    def _in_decoded_frames(self, records: list[_ImageRecord]) -> list[_ImageRecord]:
        """``records`` in the frame each image decodes to (read from the headers, in threads), annotations drawn in
        the stored frame oriented; a size that is neither the upright nor the stored one is a ``DataError``."""

        def frame(record: _ImageRecord) -> _ImageRecord | str:
            path = self.image_dir / record.file_name
            try:
                header = read_header(path, self.max_image_pixels)
            except (DecodeError, FileNotFoundError):
                return record  # NOTE: an undecodable or oversized image is handled when it is loaded (undecodable)
            stated = (record.width, record.height)
            if header.oriented_size == stated:
                return record
            if (header.width, header.height) == stated:
                if not self.orient_annotations:
                    return replace(record, exif=False)
                width, height = header.oriented_size
                boxes = orient_boxes(record.boxes, header.orientation, *stated)
                return replace(record, width=width, height=height, boxes=boxes, orientation=header.orientation)
            upright = "" if header.orientation == 1 else " ({}x{} upright, EXIF orientation {})"
            return (
                f"{path} is {header.width}x{header.height}"
                f"{upright.format(*header.oriented_size, header.orientation)} but {self.annotation_file} says "
                f"{record.width}x{record.height}"
            )

        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            framed = list(pool.map(frame, records))
        mismatched = [f for f in framed if isinstance(f, str)]
        if mismatched:
            raise DataError(
                f"{mismatched[0]} ({len(mismatched)} of the {len(records)} images differ): fix the image or its "
                "width/height entry"
            )
        kept = [f for f in framed if isinstance(f, _ImageRecord)]
        self.stored_frame_images = sum(r.orientation != 1 or not r.exif for r in kept)
        return kept

    @property
    def counts(self) -> dict[str, int]:
        """What this split holds and what was left out of its targets."""
        return {
            "images": len(self.records),
            "instances": sum(len(r.ann_ids) for r in self.records),
            "crowd_annotations": self.crowd_annotations,
            "degenerate_boxes": self.degenerate_boxes,
            "invalid_boxes": self.invalid_boxes,
            "empty_images": self.empty_images,
            "empty_images_skipped": self.empty_images_skipped,
            "stored_frame_images": self.stored_frame_images,
        }

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, record: _ImageRecord) -> np.ndarray:
        path = self.image_dir / record.file_name
        try:
            image = decode_rgb(str(path), self.max_image_pixels, apply_exif_orientation=record.exif)
        except FileNotFoundError:
            raise DataError(
                f"missing image {path} (listed in {self.annotation_file}): restore it or remove its entry"
            ) from None
        if image.shape[:2] != (record.height, record.width):
            raise DecodeError(
                f"{path} decodes to {image.shape[1]}x{image.shape[0]}, not the {record.width}x{record.height} read "
                "from its header when the dataset was built: check the file (it may have changed since)"
            )
        return image

    def __getitem__(self, index: int) -> Sample | ExcludedSample:
        """The sample at ``index``; an image that fails to decode is handled by the ``undecodable`` policy."""
        if self.skip_counter is not None:
            return decode_or_replace(self._sample, index, len(self.records), self.skip_counter)
        return decode_or_exclude(self._sample, index, self.records[index].image_id, self.undecodable)

    def _sample(self, index: int) -> Sample:
        record = self.records[index]
        image = self._decode(record)
        masks = None
        if self.with_masks and record.ann_ids:
            masks = np.stack(
                [orient_array(self.coco.annToMask(self.coco.anns[a]), record.orientation) for a in record.ann_ids]
            )
        boxes, labels, resized_hw = record.boxes, record.labels, (record.height, record.width)
        if self.transform is not None:
            data = {"image": image, "bboxes": boxes, "instance_ids": np.arange(len(labels))}
            if masks is not None:
                data["masks"] = masks
            out = self.transform(**data)
            image = out["image"]
            keep = np.asarray(out["instance_ids"], dtype=np.int64)
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = labels[keep]
            masks = np.asarray(out["masks"])[keep] if masks is not None else None
            applied = dict(out["applied_transforms"])
            resized_hw = applied["KeepRatioResize"]["resized_hw"] if "KeepRatioResize" in applied else resized_hw
            if masks is not None and "RandomCrop" in applied:
                boxes = _mask_boxes(masks)  # NOTE: mmdet's recompute_bbox: a crop cuts masks, not just boxes
            valid = (boxes[:, 2] - boxes[:, 0] > _MIN_TRANSFORMED_SIZE) & (
                boxes[:, 3] - boxes[:, 1] > _MIN_TRANSFORMED_SIZE
            )
            boxes, labels = boxes[valid], labels[valid]
            masks = masks[valid] if masks is not None else None
        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
            "scale": (resized_hw[0] / record.height, resized_hw[1] / record.width),
        }
        if self.with_masks:
            if masks is None:
                masks = np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
        return tensor, target

    def reseed(self, seed: int) -> None:
        """Reseed the transform's random generators (albumentations keeps its own, which forked workers share)."""
        if self.transform is not None:
            self.transform.set_random_seed(seed)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_args(
    img_scale: Sequence[int],
    multi_scale: Sequence[int] | None,
    large_scale_jitter: Sequence[float] | None,
    hflip: float,
    min_box_size: float,
    batch_size: int,
    eval_batch_size: int | None,
) -> None:
    if len(img_scale) != 2 or min(img_scale) < 1 or img_scale[0] < img_scale[1]:
        raise ConfigError(
            f"data.img_scale {list(img_scale)} must be [long, short] with long >= short >= 1, e.g. [1333, 800]"
        )
    if multi_scale is not None and (not multi_scale or min(multi_scale) < 1):
        raise ConfigError(
            f"data.multi_scale {multi_scale} must be a non-empty list of short sides, e.g. [480, 512, 800]"
        )
    if large_scale_jitter is not None and (
        len(large_scale_jitter) != 2 or not 0 < large_scale_jitter[0] <= large_scale_jitter[1]
    ):
        raise ConfigError(f"data.large_scale_jitter {large_scale_jitter} must be [min, max] with 0 < min <= max")
    if multi_scale is not None and large_scale_jitter is not None:
        raise ConfigError("data.multi_scale and data.large_scale_jitter are two training scale policies: set only one")
    if not 0.0 <= hflip <= 1.0:
        raise ConfigError(f"data.hflip {hflip} is a probability: use a value in [0, 1]")
    if min_box_size < 0:
        raise ConfigError(f"data.min_box_size {min_box_size} must be >= 0 (pixels)")
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ConfigError(f"data.batch_size {batch_size} / data.eval_batch_size {eval_batch_size} must be >= 1")


class COCODataModule(StrataDataModule):
    """COCO 2017 (or any dataset in its layout) for object detection and instance segmentation.

    Lin et al., "Microsoft COCO: Common Objects in Context" (arXiv 1405.0312). Batches are
    ``(list[image (3, H_i, W_i) float32 in [0, 1]], list[target])`` (see ``COCODetectionDataset``; evaluation
    batches under ``eval_undecodable="exclude"`` end with their ``ExcludedSamples``, ``collate_detection_excluding``);
    label ``l`` in ``1..K`` is category id ``category_ids[l - 1]``. ``num_classes`` is known right after construction
    (from the val annotation file), so the CLI can link it into the model.

    Args:
        root: dataset folder.
        train_annotations: train annotation file, relative to ``root`` (or absolute).
        val_annotations: val annotation file, relative to ``root`` (or absolute).
        train_images: train image folder, relative to ``root``.
        val_images: val image folder, relative to ``root``.
        with_masks: decode instance masks (Mask R-CNN).
        img_scale: (long, short) bound of the keep-ratio resize, as mmdet's ``img_scale=(1333, 800)``.
        multi_scale: training short-side bounds, one drawn per image (None: ``img_scale[1]``).
        large_scale_jitter: (min, max) random factor of the training resize, then a crop/pad to
            ``img_scale[1] x img_scale[0]`` (H x W); None disables it.
        hflip: training horizontal-flip probability.
        skip_empty_train: leave training images without instances out (validation keeps every image).
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped and counted.
        batch_size: training images per device.
        eval_batch_size: validation/test/predict images per device (default: ``batch_size``).
        num_workers: loader worker processes per device.
        pin_memory: pin host memory for faster host-to-device copies.
        persistent_workers: keep workers alive between epochs.
        max_skipped_fraction: stop the run when more than this fraction of the training samples fails to decode
            (each failure is logged, replaced and counted as ``skipped_samples`` in ``summary.json``). Evaluation
            images are never replaced.
        eval_undecodable: what an undecodable val/test/predict image does: ``"error"`` stops the run naming the file;
            ``"exclude"`` leaves it out of the benchmark (its id leaves COCOeval's ``imgIds``, its ground truth with
            it, and it gets no result records), counted as ``val/excluded_images`` and ``excluded_eval_images`` in
            ``summary.json``.
        max_image_pixels: an image with more pixels (read from its header, never decoded: a decompression bomb) is
            undecodable, handled as above; default PIL's limit; None or 0: no limit.
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_annotations: str = "annotations/instances_train2017.json",
        val_annotations: str = "annotations/instances_val2017.json",
        train_images: str = "train2017",
        val_images: str = "val2017",
        with_masks: bool = False,
        img_scale: tuple[int, int] = (1333, 800),
        multi_scale: list[int] | None = None,
        large_scale_jitter: tuple[float, float] | None = None,
        hflip: float = 0.5,
        skip_empty_train: bool = True,
        min_box_size: float = 1.0,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
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
        _check_args(img_scale, multi_scale, large_scale_jitter, hflip, min_box_size, batch_size, eval_batch_size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(
                f"COCO root {self.root} does not exist: set --data.init_args.root to the folder holding annotations/"
            )
        self.train_annotation_file = self._file(train_annotations, "train_annotations")
        self.val_annotation_file = self._file(val_annotations, "val_annotations")
        self.train_image_dir = self._folder(train_images, "train_images")
        self.val_image_dir = self._folder(val_images, "val_images")
        self._val_json: dict[str, Any] | None = load_coco_json(self.val_annotation_file, "val_annotations")
        categories = sorted(self._val_json["categories"], key=lambda c: int(c["id"]))
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self._label_of = {cat_id: i + 1 for i, cat_id in enumerate(self.category_ids)}
        self.train_set: COCODetectionDataset | None = None
        self.val_set: COCODetectionDataset | None = None
        self._val_coco: COCO | None = None

    def _file(self, relative: str, arg: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise DataError(
                f"missing annotation file {path}: fix --data.init_args.{arg} (relative to root or absolute)"
            )
        return path

    def _folder(self, relative: str, arg: str) -> Path:
        path = self.root / relative
        if not path.is_dir():
            raise DataError(f"missing image folder {path}: fix --data.init_args.{arg} (relative to root or absolute)")
        return path

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def dataset_info(self) -> dict[str, Any]:
        """Class names, the category ids of labels ``1..K`` and the val annotation file COCOeval scores against;
        no normalisation (torchvision's detectors normalise inside)."""
        return {
            "class_names": list(self.class_names),
            "category_ids": list(self.category_ids),
            "val_annotation_file": str(self.val_annotation_file),
            "mean": None,
            "std": None,
        }

    def input_sizes(self) -> dict[str, int]:
        hp = self.hparams
        sizes = {"data.img_scale": int(min(hp.img_scale))}
        if hp.multi_scale:
            sizes["data.multi_scale"] = int(min(hp.multi_scale))
        return sizes

    def label_to_category_id(self, label: int) -> int:
        """The annotation file's category id of contiguous label ``1..K``."""
        if not 1 <= int(label) <= self.num_classes:
            raise ValueError(f"label {label} is outside 1..{self.num_classes} (0 is the background)")
        return self.category_ids[int(label) - 1]

    def category_id_to_label(self, category_id: int) -> int:
        """The contiguous label ``1..K`` of an annotation file's category id."""
        if int(category_id) not in self._label_of:
            raise ValueError(f"category id {category_id} is not among {self.val_annotation_file}'s categories")
        return self._label_of[int(category_id)]

    @property
    def val_coco(self) -> COCO:
        """The pycocotools ``COCO`` of the val annotation file (built on first use)."""
        if self.val_set is not None:
            return self.val_set.coco
        if self._val_coco is None:
            with contextlib.redirect_stdout(io.StringIO()):
                self._val_coco = COCO(str(self.val_annotation_file))
        return self._val_coco

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per built split: images, instances, crowd annotations, degenerate and non-finite boxes, empty images
        (skipped), images annotated in their stored frame."""
        sets = {"train": self.train_set, "val": self.val_set}
        return {split: ds.counts for split, ds in sets.items() if ds is not None}

    def _transform(self, train: bool) -> A.Compose:
        hp = self.hparams
        return build_detection_transform(
            tuple(hp.img_scale),
            train=train,
            multi_scale=hp.multi_scale,
            large_scale_jitter=tuple(hp.large_scale_jitter) if hp.large_scale_jitter is not None else None,
            hflip=hp.hflip,
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = COCODetectionDataset(
                self.train_annotation_file,
                self.train_image_dir,
                self._transform(train=True),
                with_masks=hp.with_masks,
                skip_empty=hp.skip_empty_train,
                min_box_size=hp.min_box_size,
                category_ids=self.category_ids,
                max_image_pixels=self.max_image_pixels,
            )
            self._log_counts("train", self.train_set)
        if self.val_set is None:
            self.val_set = COCODetectionDataset(
                self.val_annotation_file,
                self.val_image_dir,
                self._transform(train=False),
                with_masks=hp.with_masks,
                skip_empty=False,
                min_box_size=hp.min_box_size,
                category_ids=self.category_ids,
                annotations=self._val_json,
                undecodable=hp.eval_undecodable,
                max_image_pixels=self.max_image_pixels,
                orient_annotations=False,
            )
            self._val_json = None
            self._log_counts("val", self.val_set)

    @staticmethod
    def _log_counts(split: str, dataset: COCODetectionDataset) -> None:
        if rank_zero_only.rank != 0:
            return
        c = dataset.counts
        logger.info(
            f"coco {split}: {c['degenerate_boxes']} degenerate and {c['invalid_boxes']} non-finite boxes dropped, "
            f"{c['empty_images_skipped']} empty images skipped ({c['images']} images, {c['instances']} instances, "
            f"{c['empty_images']} images without instances, {c['crowd_annotations']} crowd annotations left to "
            f"COCOeval, {c['stored_frame_images']} images annotated in their stored, not upright, frame)"
        )

    def _loader(self, dataset: COCODetectionDataset, train: bool) -> DataLoader:
        hp = self.hparams
        options = dict(
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.persistent_workers,
            collate_fn=collate_detection,
        )
        if train:
            # NOTE: detection keeps the ragged last batch, as mmdetection and torchvision's references do
            return self.train_loader(dataset, batch_size=hp.batch_size, drop_last=False, **options)
        if hp.eval_undecodable == "exclude":
            options["collate_fn"] = collate_detection_excluding
        batch_size = hp.eval_batch_size or hp.batch_size
        name = f"val split {self.val_annotation_file}"
        return build_loader(dataset, train=False, batch_size=batch_size, name=name, **options)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if len(self.train_set) == 0:
            raise DataError(f"{self.train_annotation_file} has no image with a usable instance: check the annotations")
        return self._loader(self.train_set, train=True)
