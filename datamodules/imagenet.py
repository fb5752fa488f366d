"""ImageNet-layout classification data: ``root/{train,val}/<class>/<image>``, timm's transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from core.errors import ConfigError, DataError

from .base import StrataDataModule
from .classification_transforms import build_eval_transform, build_train_transform, check_rand_augment
from .decode import DEFAULT_MAX_IMAGE_PIXELS, check_eval_undecodable, check_max_image_pixels, check_skipped_fraction
from .image_folder import (
    ImageFolderDataset,
    collate_classification_excluding,
    find_classes,
    read_class_names,
    scan_image_folder,
)
from .loaders import build_loader

__all__ = ["ImageNetDataModule"]


class ImageNetDataModule(StrataDataModule):
    """ImageNet (or any dataset in its class-folder layout) for classification.

    Layout: ``root/train/<class>/*`` and ``root/val/<class>/*``; the class index is the position of the folder name in
    the sorted list, and train and val must hold the same class folders. Class names come from ``class_names_file``
    (default ``root/class_names.txt`` when present), else the folder names.

    Args:
        root: dataset folder.
        img_size: training crop and evaluation crop size.
        crop_pct: evaluation resizes the short side to ``img_size / crop_pct`` and centre-crops ``img_size``.
        interpolation: PIL resize interpolation (``bicubic`` as in DeiT; ``random``: bilinear or bicubic per training
            sample, bilinear for evaluation).
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range; ``[1, 1]`` keeps shapes undistorted.
        hflip: horizontal flip probability.
        rand_augment: a timm RandAugment spec (``rand-m9-mstd0.5-inc1``) or None; checked here.
        random_erasing: random-erasing probability (DeiT's ``reprob``).
        random_erasing_mode: the erased box's fill after normalisation (DeiT's ``remode``): ``pixel`` per-pixel
            normal noise, ``rand`` one normal colour per box, ``const`` zeros.
        random_erasing_count: up to this many boxes per erased image (DeiT's ``recount``), drawn uniformly from 1.
        color_jitter: timm's ColorJitter strength for brightness, contrast and saturation, or None for none (timm
            skips it when RandAugment is on, except for the ``t3a`` op sets).
        repeated_augmentation: repeats of each training image per epoch, each on another rank with its own
            augmentation (DeiT's RASampler, timm's ``RepeatAugSampler``: 3 in the DeiT recipe; an epoch still holds
            about one pass of samples, ``N // 256 * 256``); 1 disables it (``datamodules/loaders.py``).
        mean: normalisation mean (RGB, 0-1 scale).
        std: normalisation std.
        batch_size: training batch size per device (the global batch is this times devices times nodes).
        eval_batch_size: validation/test/predict batch size per device (default: ``batch_size``).
        num_workers: loader worker processes per device.
        pin_memory: pin host memory for faster host-to-device copies.
        persistent_workers: keep workers alive between epochs.
        class_names_file: optional file of class names.
        max_skipped_fraction: stop the run when more than this fraction of the training samples fails to decode
            (each failure is logged, replaced by the next decodable image and counted as ``skipped_samples`` in
            ``summary.json``; see ``runs/health.py``). Evaluation images are never replaced.
        eval_undecodable: what an undecodable val/test/predict image does: ``"error"`` stops the run naming the file;
            ``"exclude"`` leaves it out of the metric (the top-1/top-5 denominators count decoded images only) and
            of the predictions, counted as ``val/excluded_images`` and ``excluded_eval_images`` in ``summary.json``;
            evaluation batches then end with their ``ExcludedSamples`` (``collate_classification_excluding``).
        max_image_pixels: an image with more pixels (read from its header, never decoded: a decompression bomb) is
            undecodable, handled as above; default PIL's limit; None or 0: no limit.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        rand_augment: str | None = None,
        random_erasing: float = 0.0,
        random_erasing_mode: str = "pixel",
        random_erasing_count: int = 1,
        color_jitter: float | None = None,
        repeated_augmentation: float = 1,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        class_names_file: str | None = None,
        max_skipped_fraction: float = 0.001,
        eval_undecodable: str = "error",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.max_skipped_fraction = check_skipped_fraction(max_skipped_fraction)
        check_eval_undecodable(eval_undecodable)
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        check_rand_augment(rand_augment)
        if repeated_augmentation < 1:
            raise ConfigError(
                f"data.repeated_augmentation {repeated_augmentation} must be >= 1 (1: off; the DeiT recipe uses 3)"
            )
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist: set --data.init_args.root to the dataset folder")
        self.classes = find_classes(self.root / "train")
        val_classes = find_classes(self.root / "val")
        if val_classes != self.classes:
            only_train = sorted(set(self.classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(self.classes))[:5]
            raise DataError(
                f"{self.root}/train and {self.root}/val hold different class folders "
                f"(only in train: {only_train}, only in val: {only_val}): both splits need the same classes"
            )
        names_file = Path(class_names_file) if class_names_file else self.root / "class_names.txt"
        if class_names_file and not names_file.is_file():
            raise DataError(f"class-name file {names_file} does not exist: fix --data.class_names_file")
        self.class_names = read_class_names(names_file, self.classes) if names_file.is_file() else list(self.classes)
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def timm_data_config(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            **super().timm_data_config(),
            "input_size": (3, hp.img_size, hp.img_size),
            "crop_pct": hp.crop_pct,
            "interpolation": hp.interpolation,
        }

    def input_sizes(self) -> dict[str, int]:
        return {"data.img_size": int(self.hparams.img_size)}

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_set is None:
            train_tf = build_train_transform(
                hp.img_size,
                scale=tuple(hp.scale),
                ratio=tuple(hp.ratio),
                hflip=hp.hflip,
                rand_augment=hp.rand_augment,
                random_erasing=hp.random_erasing,
                random_erasing_mode=hp.random_erasing_mode,
                random_erasing_count=hp.random_erasing_count,
                color_jitter=hp.color_jitter,
                interpolation=hp.interpolation,
                mean=tuple(hp.mean),
                std=tuple(hp.std),
            )
            samples = scan_image_folder(self.root / "train", self.classes)
            self.train_set = ImageFolderDataset(samples, train_tf, max_image_pixels=self.max_image_pixels)
        if self.val_set is None:
            eval_tf = build_eval_transform(
                hp.img_size,
                crop_pct=hp.crop_pct,
                interpolation=hp.interpolation,
                mean=tuple(hp.mean),
                std=tuple(hp.std),
            )
            samples = scan_image_folder(self.root / "val", self.classes)
            self.val_set = ImageFolderDataset(
                samples, eval_tf, undecodable=hp.eval_undecodable, max_image_pixels=self.max_image_pixels
            )

    def _loader(self, dataset: ImageFolderDataset, train: bool) -> DataLoader:
        hp = self.hparams
        options = dict(num_workers=hp.num_workers, pin_memory=hp.pin_memory, persistent_workers=hp.persistent_workers)
        if train:
            return self.train_loader(dataset, batch_size=hp.batch_size, num_repeats=hp.repeated_augmentation, **options)
        collate = collate_classification_excluding if hp.eval_undecodable == "exclude" else None
        batch_size = hp.eval_batch_size or hp.batch_size
        name = f"val split {self.root / 'val'}"
        return build_loader(dataset, train=False, batch_size=batch_size, collate_fn=collate, name=name, **options)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if len(self.train_set) < self.hparams.batch_size:
            raise DataError(
                f"{self.root}/train has {len(self.train_set)} images, fewer than one batch "
                f"(--data.batch_size {self.hparams.batch_size}): lower the batch size"
            )
        return self._loader(self.train_set, train=True)
