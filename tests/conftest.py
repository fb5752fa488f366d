"""Shared fixtures: tiny generated datasets, CPU only, quiet runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes dataset in the ImageNet layout: 8 classes, 8 train / 4 val images each, 32x32."""
    from datamodules.shapes import write_classification_dataset

    return write_classification_dataset(
        tmp_path_factory.mktemp("data") / "imagenet", num_train_per_class=8, num_val_per_class=4, image_size=32
    )
