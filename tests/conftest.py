"""Shared fixtures: tiny generated datasets in the three layouts, one torch thread, offline loggers.

Helpers shared by test modules live in ``tests/support/``: ``cli.py`` (running ``train.py`` on tiny configs),
``scripts.py`` (the command-line scripts as modules), ``fault_injection.py``, ``official_names.py``,
``rank_streams.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes dataset in the ImageNet layout: 8 classes, 8 train / 4 val images each, 32x32."""
    from datamodules.shapes import write_classification_dataset

    return write_classification_dataset(
        tmp_path_factory.mktemp("data") / "imagenet", num_train_per_class=8, num_val_per_class=4, image_size=32
    )


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes dataset in the COCO 2017 layout: 8 train / 4 val images at 64x64 (read-only: copy to modify)."""
    from datamodules.shapes_coco import write_coco_dataset

    return write_coco_dataset(tmp_path_factory.mktemp("data") / "coco", num_train=8, num_val=4, image_size=64)


@pytest.fixture(scope="session")
def tiny_ade20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes dataset in the ADEChallengeData2016 layout: 8 train / 3 val scenes at 64x64 (read-only)."""
    from datamodules.shapes_ade20k import write_ade20k_dataset

    return write_ade20k_dataset(tmp_path_factory.mktemp("data") / "ade20k", num_train=8, num_val=3, image_size=64)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny inputs: it avoids spin-wait slowdowns when the CPU cores are shared.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
