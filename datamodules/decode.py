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

A file that cannot be decoded raises ``DecodeError``. What a dataset does with it depends on what the samples are
for (its ``undecodable`` policy):

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image, ImageCms
from torch.utils.data import get_worker_info

from core.errors import ConfigError, DataError

__all__ = [
    "EVAL_UNDECODABLE",
    "DecodeError",
    "ExcludedSample",
    "ExcludedSamples",
    "SkipCounter",
    "check_eval_undecodable",
    "check_skipped_fraction",
    "check_undecodable_policy",
    "decode_or_exclude",
    "decode_or_replace",
    "decode_rgb",
    "decode_rgb_image",
    "excluded_samples",
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


class DecodeError(Exception):
    """A file that exists but does not decode to an image (truncated, zero-byte, corrupt or not an image at all)."""


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


def _decode(path: str | Path, convert: Callable[[Image.Image], T]) -> T:
    """``convert`` of the fully decoded image at ``path``; an undecodable file is a ``DecodeError`` naming it."""
    try:
        with Image.open(path) as image:
            image.load()  # NOTE: decode fully here, so a truncated file fails now and not inside a transform
            return convert(image)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise DecodeError(f"{path} ({size} bytes): {type(error).__name__}: {error}") from None


def _checked(rgb: np.ndarray, path: str | Path) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise DecodeError(f"{path}: decoded to shape {rgb.shape}, not an (H, W, 3) image")
    return rgb


def decode_rgb(path: str | Path) -> np.ndarray:
    """Decode the image file at ``path`` to an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        FileNotFoundError: the file does not exist (a structural problem: the caller decides).
        DecodeError: the file exists but is not a decodable image; the message names the file and the cause.
    """
    return np.ascontiguousarray(_checked(_decode(path, to_rgb), path))


def decode_rgb_image(path: str | Path) -> Image.Image:
    """``decode_rgb`` as an RGB PIL image, for PIL transforms (timm's): an RGB file is not copied through numpy.

    Raises:
        FileNotFoundError: the file does not exist (a structural problem: the caller decides).
        DecodeError: the file exists but is not a decodable image; the message names the file and the cause.
    """

    def convert(image: Image.Image) -> Image.Image:
        if image.mode == "RGB" and min(image.size) >= 1:
            return image.copy()
        return Image.fromarray(_checked(np.ascontiguousarray(to_rgb(image)), path))

    return _decode(path, convert)


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
