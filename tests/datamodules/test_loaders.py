"""Resumable training loaders: order and augmentation depend on (seed, epoch, index) only; a skip resumes exactly."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.loaders import ResumableSampler, build_loader


class RandomDraws(Dataset):
    """Returns (index, a number drawn from the generator that ``reseed`` seeds): a stand-in for an augmentation."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return self.size

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(self.rng.random())


def _epoch(loader: torch.utils.data.DataLoader, epoch: int) -> list[tuple[int, float]]:
    loader.sampler.set_epoch(epoch)
    return [(int(i), float(v)) for indices, values in loader for i, v in zip(indices, values)]


def test_order_and_augmentation_do_not_depend_on_workers() -> None:
    dataset = RandomDraws(23)
    main = _epoch(build_loader(dataset, train=True, batch_size=4, num_workers=0, seed=7), 3)
    workers = _epoch(build_loader(dataset, train=True, batch_size=4, num_workers=2, seed=7), 3)
    assert main == workers and len(main) == 20  # 23 samples, batches of 4, ragged last batch dropped
    assert _epoch(build_loader(dataset, train=True, batch_size=4, num_workers=0, seed=7), 4) != main


def test_skip_resumes_with_exactly_the_unseen_samples() -> None:
    dataset = RandomDraws(40)
    full = _epoch(build_loader(dataset, train=True, batch_size=4, num_workers=0, seed=1), 2)
    resumed_loader = build_loader(dataset, train=True, batch_size=4, num_workers=0, seed=1)
    resumed_loader.sampler.skip(2, 12)
    assert len(resumed_loader) == 10  # Lightning counts batches from the epoch start it restores
    assert _epoch(resumed_loader, 2) == full[12:]
    assert _epoch(resumed_loader, 2) == full  # the skip applies once


def test_skip_of_another_epoch_is_ignored() -> None:
    sampler = ResumableSampler(RandomDraws(10), seed=0)
    sampler.skip(5, 4)
    sampler.set_epoch(6)
    assert len(list(sampler)) == 10


def test_evaluation_loader_keeps_order_and_every_sample() -> None:
    loader = build_loader(RandomDraws(9), train=False, batch_size=4, num_workers=0)
    assert [int(i) for indices, _ in loader for i in indices] == list(range(9))
