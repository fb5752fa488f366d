"""The data contract: what tasks and the run layer read from a datamodule, declared instead of read off its fields.

Tasks get ``dataset_info`` (linked into ``model.init_args.dataset_info`` by ``train.py``, like ``num_classes``);
the run layer (``runs/``) calls the methods below: the export's data config, the input sizes checked against the
backbone's stride before any image is read, the training sets' skip counters, and a name for ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L

from .decode import SkipCounter
from .loaders import EvalLoadersMixin, ResumableTrainLoaderMixin

__all__ = ["StrataDataModule"]


class StrataDataModule(ResumableTrainLoaderMixin, EvalLoadersMixin, L.LightningDataModule):
    """Base of the project's datamodules: resumable training loader, exact evaluation loaders, and the contract.

    Subclasses set ``root``, ``class_names``, ``max_skipped_fraction`` and ``train_set`` / ``val_set`` (datasets
    with a ``skip_counter``), and implement ``num_classes``, ``input_sizes`` and the normalisation in ``dataset_info``.
    """

    root: Path
    class_names: list[str]
    max_skipped_fraction: float
    train_set: Any = None
    val_set: Any = None

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def dataset_info(self) -> dict[str, Any]:
        """What a task needs to know of the data: ``class_names``, and the ``mean`` / ``std`` its images were
        normalised with (None when the model normalises them itself, as torchvision's detectors do)."""
        hp = self.hparams
        mean, std = hp.get("mean"), hp.get("std")
        return {
            "class_names": list(self.class_names),
            "mean": tuple(mean) if mean is not None else None,
            "std": tuple(std) if std is not None else None,
        }

    def timm_data_config(self) -> dict[str, Any]:
        """timm's data config of the exported weights (``pretrained_cfg``): the normalisation, and for image-level
        data the input size, crop fraction and interpolation."""
        info = self.dataset_info
        return {key: info[key] for key in ("mean", "std") if info.get(key) is not None}

    def input_sizes(self) -> dict[str, int]:
        """``{argument: smallest image side}`` of every input size this datamodule feeds the model."""
        raise NotImplementedError

    def describe(self) -> str:
        """The data, in one string for ``summary.json`` (its root folder)."""
        return str(self.root)

    def training_skip_counters(self) -> list[tuple[SkipCounter, int]]:
        """``(skip counter, dataset size)`` of the training sets built so far (evaluation never skips a sample)."""
        if self.train_set is None or self.train_set.skip_counter is None:
            return []
        return [(self.train_set.skip_counter, len(self.train_set))]
