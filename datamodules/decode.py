"""Decoding image files to 8-bit RGB whatever they hold, and the accounting of samples that cannot be decoded.

Real datasets hold surprises: ImageNet has CMYK JPEGs, grayscale JPEGs and a PNG named ``.JPEG``; scraped data has
16-bit PNGs, palette images with transparency, truncated and zero-byte files. ``decode_rgb`` reads the format from the
file's content (never its extension) and converts every mode explicitly:

- ``RGB``: as is; ``RGBA``/``LA``/``PA``: alpha dropped (the colour channels kept, as torchvision and timm do);
- ``L``/``1``/``P``: replicated to three channels (``P`` through its palette);
- ``CMYK`` (also Adobe inverted CMYK and YCCK JPEGs, which Pillow's decoder turns into plain CMYK): through the
  embedded ICC profile when there is one, else ``(255 - c)(255 - k) / 255`` per channel;
- ``I;16*``/``I`` (16-bit): scaled ``v * 255 / 65535`` (rounded), never clipped at 255; ``F``: [0, 1] floats scaled by
  255, other ranges clipped to [0, 255].

The EXIF Orientation tag (2..8, as phones write it) is applied as ``PIL.ImageOps.exif_transpose`` applies it (and
torchvision's ``decode_image(..., apply_exif_orientation=True)``), so images are decoded upright, as displayed;
``orient_array`` and ``orient_boxes`` apply the same transform to masks and boxes drawn in the stored frame, and
``read_header`` gives a file's stored size and orientation without decoding it. An image of more than
``max_pixels`` pixels (default ``DEFAULT_MAX_IMAGE_PIXELS``, PIL's decompression-bomb threshold) is refused from its
header, before any pixel is decoded.

A file that cannot be decoded raises ``DecodeError`` (one over the pixel limit its subclass ``PixelLimitError``).
What a dataset does with it depends on what the samples are for (its ``undecodable`` policy):

- training (``"replace"``): count it in a ``SkipCounter`` and return another sample in its place
  (``decode_or_replace``), so a bad file costs one sample, never the run;
- evaluation, never substituted (a datamodule's ``eval_undecodable``): ``"error"`` stops the run with a one-line
  ``DataError`` naming the file; ``"exclude"`` returns an ``ExcludedSample`` that the datamodules' excluding collate
  functions drop from the batch and append as its last element, ``ExcludedSamples`` (``split_excluded``), so the
  metric is computed exactly as if the image were not in the dataset and the tasks count what was left out
  (``runs/health.py``).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms
from torch.utils.data import get_worker_info

from core.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EVAL_UNDECODABLE",
    "DecodeError",
    "ExcludedSample",
    "ExcludedSamples",
    "ImageHeader",
    "PixelLimitError",
    "SkipCounter",
    "check_eval_undecodable",
    "check_max_image_pixels",
    "check_skipped_fraction",
    "check_undecodable_policy",
    "decode_or_exclude",
    "decode_or_replace",
    "decode_rgb",
    "decode_rgb_image",
    "excluded_samples",
    "open_image",
    "orient_array",
    "orient_boxes",
    "read_header",
    "split_excluded",
    "to_rgb",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# NOTE: worker processes write their own row, so increments never race; more workers than rows share rows modulo.
_COUNTER_ROWS = 257
_REPLACEMENT_TRIES = 16
_SRGB = ImageCms.createProfile("sRGB")

EVAL_UNDECODABLE = ("error", "exclude")
# NOTE: PIL's Image.MAX_IMAGE_PIXELS as it ships (1024 * 1024 * 1024 // 4 // 3); a literal, as PIL's can be changed
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DecodeError(Exception):
    """A file that exists but does not decode to an image (truncated, zero-byte, corrupt or not an image at all)."""


class PixelLimitError(DecodeError):
    """An image of more pixels than the limit (a decompression bomb, or just too large), refused from its header."""


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # NOTE: a broken profile falls back to the plain conversion below
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> np.ndarray:
    """An opened, loaded PIL image as an ``(H, W, 3)`` uint8 RGB array (the mode rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(image))
    if mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        gray = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def check_max_image_pixels(value: int | None) -> int | None:
    """Validate a datamodule's ``max_image_pixels``: a pixel count, or ``None`` / 0 for no limit (returned as None)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"data.max_image_pixels {value!r} must be a pixel count (default {DEFAULT_MAX_IMAGE_PIXELS}, PIL's "
            "decompression-bomb limit) or 0 / null for no limit"
        )
    return value


def _over_limit(path: str | Path, pixels: int | str, limit: int | None, size: str = "") -> PixelLimitError:
    return PixelLimitError(
        f"{path}: {size}{pixels} pixels, above the limit of {limit} pixels (a decompression bomb or an oversized "
        "image): downscale it, or raise the limit with --data.init_args.max_image_pixels N (0: none)"
    )


def _let_pil_open(max_pixels: int | None) -> None:
    # NOTE: Image.open raises above twice PIL's global limit before any size can be checked here; it is raised
    # (never lowered) to this limit in whichever process opens the file, so DataLoader workers get it too
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and (max_pixels is None or max_pixels > pil_limit):
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image file at ``path`` opened (its header read, no pixel decoded), for use as a context manager.

    Raises:
        FileNotFoundError: the file does not exist (a structural problem: the caller decides).
        DecodeError: the file is not an image; ``PixelLimitError`` when it has more than ``max_pixels`` pixels
            (None: no limit). The message names the file, and for the latter its pixel count, the limit and the fix.
    """
    _let_pil_open(max_pixels)
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as error:
        found = _PIL_BOMB_PIXELS.search(str(error))
        raise _over_limit(path, found.group(1) if found else "too many", max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise DecodeError(f"{path} ({size} bytes): {type(error).__name__}: {error}") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise _over_limit(path, width * height, max_pixels, f"{width}x{height}, ")
    return image


def _orientation(image: Image.Image, *, decoded: bool) -> int:
    """The EXIF orientation ``ImageOps.exif_transpose`` applies (1 when none or unreadable)."""
    try:
        # NOTE: PNG's getexif decodes the file to find an eXIf chunk after the pixels; a header read skips those
        exif = image.getexif() if decoded else Image.Image.getexif(image)
        orientation = exif.get(ExifTags.Base.Orientation, 1)
    except Exception:  # NOTE: a corrupt EXIF block is no orientation; the pixels still decode
        return 1
    return orientation if isinstance(orientation, int) and orientation in _TRANSPOSE else 1


class ImageHeader(NamedTuple):
    """What an image file's header says: its stored ``width`` and ``height`` and its EXIF ``orientation`` (1..8)."""

    width: int
    height: int
    orientation: int

    @property
    def oriented_size(self) -> tuple[int, int]:
        """``(width, height)`` once the orientation is applied (as displayed, as ``decode_rgb`` decodes it)."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def read_header(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """The stored size and EXIF orientation of the image at ``path``, from its header (no pixel is decoded).

    Raises:
        FileNotFoundError: the file does not exist.
        DecodeError: the file is not an image or has more than ``max_pixels`` pixels (``open_image``).
    """
    with open_image(path, max_pixels) as image:
        return ImageHeader(image.width, image.height, _orientation(image, decoded=False))


def orient_array(array: np.ndarray, orientation: int) -> np.ndarray:
    """An ``(H, W, ...)`` array (a mask, an image) transposed as ``ImageOps.exif_transpose`` transposes an image of
    EXIF ``orientation``; contiguous, a copy unless ``orientation`` is 1 (or not 2..8)."""
    if orientation not in _TRANSPOSE:
        return array
    oriented = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }[orientation](array)
    return np.ascontiguousarray(oriented)


def orient_boxes(boxes: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """``(N, 4)`` ``xyxy`` boxes drawn on a ``width x height`` stored image, in the frame ``orient_array`` (and
    ``decode_rgb``) gives that image for EXIF ``orientation``: each box covers the same pixels as before."""
    if orientation not in _TRANSPOSE or not len(boxes):
        return boxes
    x, y = boxes[:, [0, 2]], boxes[:, [1, 3]]
    new_x, new_y = {
        2: (width - x, y),
        3: (width - x, height - y),
        4: (x, height - y),
        5: (y, x),
        6: (height - y, x),
        7: (height - y, width - x),
        8: (y, width - x),
    }[orientation]
    stacked = [new_x.min(axis=1), new_y.min(axis=1), new_x.max(axis=1), new_y.max(axis=1)]
    return np.stack(stacked, axis=1).astype(boxes.dtype)


def _decode(
    path: str | Path, convert: Callable[[Image.Image, bool], T], max_pixels: int | None, apply_exif_orientation: bool
) -> T:
    """``convert(image, copied)`` of the fully decoded (and oriented) image at ``path``; ``copied`` says whether the
    image is already a copy of the file's; an undecodable or oversized file is a ``DecodeError`` naming it."""
    with open_image(path, max_pixels) as image:
        try:
            image.load()  # NOTE: decode fully here, so a truncated file fails now and not inside a transform
            orientation = _orientation(image, decoded=True) if apply_exif_orientation else 1
            if orientation == 1:
                return convert(image, False)
            return convert(image.transpose(_TRANSPOSE[orientation]), True)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            raise DecodeError(f"{path} ({size} bytes): {type(error).__name__}: {error}") from None


def _checked(rgb: np.ndarray, path: str | Path) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DecodeError(f"{path}: decoded to shape {rgb.shape}, not an (H, W, 3) image")
    return rgb


def decode_rgb(
    path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *, apply_exif_orientation: bool = True
) -> np.ndarray:
    """Decode the image file at ``path`` to an ``(H, W, 3)`` uint8 RGB array, upright (its EXIF orientation applied
    unless ``apply_exif_orientation`` is False).

    Raises:
        FileNotFoundError: the file does not exist (a structural problem: the caller decides).
        DecodeError: the file exists but is not a decodable image, or has more than ``max_pixels`` pixels (None: no
            limit; checked from the header, before decoding); the message names the file and the cause.
    """
    rgb = _decode(path, lambda image, _: to_rgb(image), max_pixels, apply_exif_orientation)
    return np.ascontiguousarray(_checked(rgb, path))


def decode_rgb_image(
    path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *, apply_exif_orientation: bool = True
) -> Image.Image:
    """``decode_rgb`` as an RGB PIL image, for PIL transforms (timm's): an RGB file is not copied through numpy.

    Raises:
        FileNotFoundError: the file does not exist (a structural problem: the caller decides).
        DecodeError: the file exists but is not a decodable image, or has more than ``max_pixels`` pixels; the
            message names the file and the cause.
    """

    def convert(image: Image.Image, copied: bool) -> Image.Image:
        if image.mode == "RGB" and min(image.size) >= 1:
            return image if copied else image.copy()
        return Image.fromarray(_checked(np.ascontiguousarray(to_rgb(image)), path))

    return _decode(path, convert, max_pixels, apply_exif_orientation)


class SkipCounter:
    """Requested and skipped samples of one dataset, shared by the main process and its DataLoader workers.

    The counts live in a shared-memory tensor with one row per process (the main process row 0, worker ``i`` row
    ``i + 1``), so workers started by ``fork`` or ``spawn`` all add to the tensor the main process reads and no two
    processes write the same row. ``requested`` counts calls for a sample, ``skipped`` those whose file failed to
    decode. Counts are per process group (one DDP rank); ``runs/health.py`` sums them across ranks.
    """

    def __init__(self) -> None:
        self._counts = torch.zeros(_COUNTER_ROWS, 2, dtype=torch.int64).share_memory_()

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (_COUNTER_ROWS - 1)

    def add(self, skipped: bool) -> None:
        """Record one requested sample, skipped or not."""
        row = self._counts[self._row()]
        row[0] += 1
        if skipped:
            row[1] += 1

    @property
    def requested(self) -> int:
        return int(self._counts[:, 0].sum())

    @property
    def skipped(self) -> int:
        return int(self._counts[:, 1].sum())


def decode_or_replace(load: Callable[[int], T], index: int, length: int, counter: SkipCounter) -> T:
    """``load(index)``, or when its file fails to decode, ``load`` of the next index that decodes.

    The failure is logged (file and cause) and counted once in ``counter``; replacements are tried in index order
    (``index + 1, index + 2, ...`` modulo ``length``), so the substitute does not depend on the worker or the random
    state and a resumed run replays it. The substitute keeps its own label: a skipped file never lends its label to
    another image. Training batches keep their size (mixup needs an even batch, DDP ranks the same step count, the
    resumable loader counts samples by batches). For training only: an evaluation set never substitutes
    (``decode_or_exclude``).

    Raises:
        DataError: when ``_REPLACEMENT_TRIES`` consecutive samples fail, which is a broken dataset, not a bad file.
    """
    try:
        sample = load(index)
    except DecodeError as error:
        counter.add(skipped=True)
        logger.warning(f"skipped sample {index}: cannot decode {error}")
        first_error = error
    else:
        counter.add(skipped=False)
        return sample
    for step in range(1, min(_REPLACEMENT_TRIES, length)):
        try:
            return load((index + step) % length)
        except DecodeError:
            continue
    raise DataError(
        f"{_REPLACEMENT_TRIES} consecutive samples from index {index} fail to decode (first: {first_error}): "
        "the dataset is broken; check its files"
    )


def check_skipped_fraction(value: float) -> float:
    """Validate a datamodule's ``max_skipped_fraction`` (a fraction in [0, 1])."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"data.max_skipped_fraction {value} is a fraction of the samples: use a value in [0, 1] (e.g. 0.001)"
        )
    return float(value)


def check_eval_undecodable(value: str) -> str:
    """Validate a datamodule's ``eval_undecodable`` (``"error"`` or ``"exclude"``)."""
    if value not in EVAL_UNDECODABLE:
        raise ConfigError(
            f"data.eval_undecodable {value!r} is not a policy: use 'error' (stop at an undecodable val/test image) or "
            "'exclude' (leave such images out of the metric, counted as excluded_images)"
        )
    return value


class ExcludedSample(NamedTuple):
    """An evaluation sample left out because its image does not decode (``eval_undecodable="exclude"``).

    The dataset returns it in the sample's place; the evaluation collate functions drop it from the batch and keep it
    in the batch's ``ExcludedSamples``. ``index`` is the position in the dataset, ``key`` what the benchmark calls the
    image (COCO image id, ADE20K name, else the index), ``reason`` the decode error naming the file.
    """

    index: int
    key: int | str
    reason: str


class ExcludedSamples(list):
    """The ``ExcludedSample`` entries of one evaluation batch, its last element under ``eval_undecodable="exclude"``.

    Under ``"error"`` (the default) evaluation batches keep their usual shape. A list type of its own, so that tasks
    find it by type (``excluded_samples``); Lightning's device transfer and the loader's memory pinning rebuild a
    list subclass as the same type.
    """


def split_excluded(samples: Sequence[T | ExcludedSample]) -> tuple[list[T], ExcludedSamples]:
    """The decoded samples of a batch, in order, and the excluded ones (for the evaluation collate functions)."""
    kept = [sample for sample in samples if not isinstance(sample, ExcludedSample)]
    return kept, ExcludedSamples(sample for sample in samples if isinstance(sample, ExcludedSample))


def excluded_samples(batch: Any) -> ExcludedSamples:
    """The samples an evaluation batch left out (none for a batch without an ``ExcludedSamples`` element)."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[-1], ExcludedSamples):
        return batch[-1]
    return ExcludedSamples()


def decode_or_exclude(load: Callable[[int], T], index: int, key: int | str, policy: str) -> T | ExcludedSample:
    """``load(index)`` for evaluation, never substituted: when its file fails to decode, a one-line ``DataError``
    naming the file (``policy="error"``) or, logged, an ``ExcludedSample`` in its place (``policy="exclude"``)."""
    try:
        return load(index)
    except DecodeError as error:
        if policy != "exclude":
            raise DataError(
                f"cannot decode evaluation image {error}: fix or remove the file, or set "
                "--data.init_args.eval_undecodable exclude to leave undecodable images out of the metric (counted)"
            ) from None
        logger.warning(f"excluded evaluation sample {index} from the metric: cannot decode {error}")
        return ExcludedSample(index=index, key=key, reason=str(error))


def check_undecodable_policy(policy: str) -> str:
    """Validate a dataset's ``undecodable`` policy: ``"replace"`` (training) or one of ``EVAL_UNDECODABLE``."""
    if policy != "replace" and policy not in EVAL_UNDECODABLE:
        raise ConfigError(f"undecodable policy {policy!r}: use 'replace' (training), 'error' or 'exclude' (evaluation)")
    return policy
