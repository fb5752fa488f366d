"""The classification transforms: timm's own ``create_transform`` pipelines, run per sample under the project's seeds.

The DeiT recipe ("Training data-efficient image transformers & distillation through attention", Touvron et al., arXiv
2012.12877; BiFormer trains with it) is timm's PIL pipeline, built here by ``timm.data.create_transform`` itself:
train ``RandomResizedCropAndInterpolation -> flip -> RandAugment (or colour jitter) -> ToTensor -> Normalize ->
RandomErasing``; eval ``Resize(floor(img_size / crop_pct)) -> CenterCrop(img_size) -> ToTensor -> Normalize``. The
project adds two things only: ``SeededTimmTransform`` runs it on the datasets' ``(H, W, 3)`` uint8 arrays under a
per-sample seed without moving the caller's random streams, and posterize at 0 kept bits (which Pillow 13 rejects)
gives the black image older Pillow returned. ``scripts/benchmark_randaugment_ops.py`` measured PIL against OpenCV
versions of the ops before this choice.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_aa

from core.errors import ConfigError

__all__ = [
    "PIL_INTERPOLATIONS",
    "RANDOM_ERASING_MODES",
    "RAND_AUGMENT_EXAMPLE",
    "SeededTimmTransform",
    "build_eval_transform",
    "build_train_transform",
    "check_rand_augment",
    "find_rand_augment",
    "posterize_or_black",
    "seeded_global_streams",
    "with_black_posterize",
]

RAND_AUGMENT_EXAMPLE = "rand-m9-mstd0.5-inc1"
PIL_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
RANDOM_ERASING_MODES = ("const", "rand", "pixel")

_SPEC_PARTS = "m<int>, n<int>, p<float>, mstd<float> (>100: uniform), mmax<int>, inc<0|1>, t<set>"


def _spec_error(spec: str, why: str) -> ConfigError:
    return ConfigError(f"data.rand_augment {spec!r}: {why}; for example {RAND_AUGMENT_EXAMPLE!r}")


def _why_part_fails(part: str) -> str:
    key, value = re.match(r"(\D*)(.*)", part, re.DOTALL).groups()  # NOTE: split at the first digit, as timm does
    if key == "w":
        return f"{part!r}: timm 1.0.31 has no '-w<n>' weights key any more, use '-tweights' (w0 is not its equal)"
    if key in ("m", "n", "mmax", "inc"):
        return f"{part!r}: {key} takes an integer, got {value!r}"
    if key in ("p", "mstd"):
        return f"{part!r}: {key} takes a number, got {value!r}"
    return f"unknown part {part!r} (parts: {_SPEC_PARTS})"


def check_rand_augment(spec: str | None) -> str | None:
    """Validate a timm RandAugment spec (``rand-m9-mstd0.5-inc1``) up front; None or ``""`` means off.

    timm's own parser (``timm.data.auto_augment.rand_augment_transform``) is the judge: each ``-`` part is parsed
    alone, so the error names the part it rejects. Every spec timm accepts passes (timm ignores parts without digits
    and falls back to the default op set for an unknown ``t<name>``), except a weighted set (``tweights``, ``t3aw``)
    asked for more ops per image than it holds, which timm accepts and then fails on at the first image.

    Raises:
        ConfigError: one line naming ``data.rand_augment``, the bad part and an example.
    """
    if not spec:
        return None
    head, *parts = spec.split("-")
    if head != "rand":
        raise _spec_error(spec, f"it must start with 'rand-', not {head + '-'!r}")
    for part in parts:
        try:
            timm_aa.rand_augment_transform(f"rand-{part}")
        except (AssertionError, ValueError):
            raise _spec_error(spec, _why_part_fails(part)) from None
    policy = timm_aa.rand_augment_transform(spec)
    if policy.choice_weights is not None and policy.num_layers > len(policy.ops):
        raise _spec_error(
            spec, f"n{policy.num_layers} draws without replacement from a weighted set of {len(policy.ops)} ops"
        )
    return spec


def posterize_or_black(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, except that keeping ``bits_to_keep <= 0`` bits gives the black image.

    Pillow posterizes with the lookup table ``i & ~(2 ** (8 - bits) - 1)``; at ``bits = 0`` the mask is ``~255`` and
    every value maps to 0 (a negative ``bits``, reachable with ``mmax`` above 10, also masks every bit). Pillow before
    13.0 ran that table for any ``bits``; 13.0 raises "bits must be between or equal to 1 and 8", which timm's
    ``PosterizeIncreasing`` reaches at magnitude 10 (``4 - int(10 / 10 * 4) = 0``; with ``rand-m9-mstd0.5-inc1``
    1 image in ~650: 2 slots x 1/15 x p 0.5 x P(gauss(9, 0.5) >= 10) = 0.023) and ``Posterize`` below magnitude 2.5.
    Black is what timm's recipe meant and got.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_aa.posterize(img, bits_to_keep, **kwargs)


def find_rand_augment(transform: Callable) -> timm_aa.RandAugment | None:
    """The ``RandAugment`` step of a torchvision ``Compose`` built by timm, or None."""
    steps = getattr(transform, "transforms", [])
    return next((step for step in steps if isinstance(step, timm_aa.RandAugment)), None)


@contextlib.contextmanager
def seeded_global_streams(seed: int) -> Iterator[None]:
    """Run the body with python ``random``, numpy's global generator and torch's CPU generator seeded with ``seed``
    (as ``random.seed``, ``np.random.seed`` and ``torch.manual_seed`` seed them); the caller's states come back after.

    Only the CPU generator of torch is touched (``torch.manual_seed`` would also reseed CUDA's).
    """
    # NOTE: not thread-safe (the globals are shared); the loaders call transforms from one thread per process.
    caller = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(caller[0])
        np.random.set_state(caller[1])
        torch.set_rng_state(caller[2])


class SeededTimmTransform:
    """A timm transform (PIL image in, tensor out) with the call signature of the project's albumentations pipelines.

    ``transform(image=image)["image"]`` takes an RGB PIL image (what ``ImageFolderDataset`` decodes) or an
    ``(H, W, 3)`` uint8 RGB array (converted to PIL once) and runs timm's
    transform inside ``seeded_global_streams(s)``: timm draws from the global python ``random``, numpy and torch (CPU)
    generators, seeded with ``s`` for the call, and the caller's states come back afterwards, so the caller's streams
    never move (loading in the main process leaves the model's dropout masks alone). The first call after
    ``set_random_seed(seed)`` runs with ``s = seed``, so it produces exactly what timm's transform produces after
    ``random.seed(seed)``, ``np.random.seed(seed)``, ``torch.manual_seed(seed)``; later calls take ``s`` from
    ``random.Random(seed).getrandbits(32)`` in turn. Never seeded, ``s`` comes from a generator seeded from OS entropy,
    anew in each process, so forked workers differ.

    Args:
        transform: a callable built by ``timm.data.create_transform`` (or any callable on PIL images).
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform
        self._seed: int | None = None
        self._stream: random.Random | None = None
        self._stream_pid: int | None = None

    @property
    def rand_augment(self) -> timm_aa.RandAugment | None:
        """The pipeline's RandAugment step (its ops are this pipeline's own instances), or None."""
        return find_rand_augment(self.transform)

    def set_random_seed(self, seed: int) -> None:
        """Seed the next call with ``seed`` (a 32-bit integer) and the calls after it from ``random.Random(seed)``."""
        self._seed, self._stream, self._stream_pid = seed, None, None

    def next_seed(self) -> int:
        """The seed the next call runs under (drawing it: the call after that gets the one after)."""
        if self._stream is None and self._seed is not None:
            self._stream = random.Random(self._seed)
            return self._seed
        if self._stream is None or self._stream_pid not in (None, os.getpid()):
            self._stream, self._stream_pid = random.Random(), os.getpid()
        return self._stream.getrandbits(32)

    def random_streams(self) -> contextlib.AbstractContextManager[None]:
        """``seeded_global_streams`` with the next call's seed: run timm's random steps inside it."""
        return seeded_global_streams(self.next_seed())

    def __call__(self, *, image: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        with self.random_streams():
            return {"image": self.transform(pil)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def _check_interpolation(name: str, train: bool) -> None:
    allowed = PIL_INTERPOLATIONS + (("random",) if train else ())
    if name not in allowed:
        raise ConfigError(f"data.interpolation {name!r}: use one of {', '.join(allowed)} (PIL resampling, as timm)")


def with_black_posterize(transform: Callable) -> Callable:
    """``transform`` with the posterize ops of its RandAugment step (these instances only, never timm's module)
    running ``posterize_or_black``."""
    policy = find_rand_augment(transform)
    for op in policy.ops if policy is not None else []:
        if op.aug_fn is timm_aa.posterize:
            op.aug_fn = posterize_or_black
    return transform


def build_train_transform(
    img_size: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    rand_augment: str | None = None,
    random_erasing: float = 0.0,
    random_erasing_mode: str = "pixel",
    random_erasing_count: int = 1,
    color_jitter: float | None = None,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> SeededTimmTransform:
    """timm's training pipeline, ``create_transform(is_training=True, ...)``, seeded per sample.

    RandomResizedCrop(``scale``, log-uniform ``ratio``, ``interpolation``; ``random`` picks bilinear or bicubic per
    call) -> horizontal flip -> RandAugment ``rand_augment`` (ops fill with ``round(255 * mean)``, translate by up to
    ``int(0.45 * img_size)`` pixels) -> ColorJitter(``color_jitter``; timm skips it when RandAugment is on, except for
    ``t3a`` sets; None: off) -> ToTensor -> Normalize(``mean``, ``std``) -> RandomErasing(probability
    ``random_erasing``, ``random_erasing_mode`` const/rand/pixel, 1 to ``random_erasing_count`` boxes).
    """
    spec = check_rand_augment(rand_augment)
    _check_interpolation(interpolation, train=True)
    if random_erasing_mode not in RANDOM_ERASING_MODES:
        raise ConfigError(
            f"data.random_erasing_mode {random_erasing_mode!r}: use one of {', '.join(RANDOM_ERASING_MODES)}"
        )
    if int(random_erasing_count) < 1:
        raise ConfigError(f"data.random_erasing_count {random_erasing_count}: erase at least 1 box per image")
    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=0.0,
        color_jitter=color_jitter,
        auto_augment=spec,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=random_erasing,
        re_mode=random_erasing_mode,
        re_count=int(random_erasing_count),
    )
    return SeededTimmTransform(with_black_posterize(transform))


def build_eval_transform(
    img_size: int,
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> SeededTimmTransform:
    """timm's eval pipeline, ``create_transform(is_training=False, ...)``: short side to ``floor(img_size /
    crop_pct)``, centre crop ``img_size``, ToTensor, Normalize. ``random`` interpolation evaluates bilinear (timm's
    fallback where it cannot draw)."""
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"data.crop_pct {crop_pct}: must be in (0, 1]")
    interpolation = "bilinear" if interpolation == "random" else interpolation
    _check_interpolation(interpolation, train=False)
    transform = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=tuple(mean), std=tuple(std)
    )
    return SeededTimmTransform(transform)
