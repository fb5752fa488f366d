"""Data loaders that resume exactly: the training order and every sample's augmentation depend only on
(seed, epoch, position in the epoch's global order), and a run restarted from a mid-epoch checkpoint sees exactly the
samples it had not seen yet. The order is ``DistributedSampler``'s, or with repeated augmentation timm's
``RepeatAugSampler``'s (DeiT's ``RASampler``).

Written by hand because Lightning restores a loader's position only through a ``state_dict`` the loader provides,
and the maintained stateful loader (``torchdata.nodes`` / ``StatefulDataLoader``) replays augmentations only when
every worker's random state is snapshotted, which a checkpoint taken from the main process cannot do. Seeding each
sample from (seed, epoch, index) makes the augmentation independent of which worker draws it, so only the position
has to be stored.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from .samplers import UnpaddedDistributedSampler
from .worker_signals import leave_preemption_signals_to_the_main_process

__all__ = [
    "EvalLoadersMixin",
    "ResumableSampler",
    "ResumableTrainLoaderMixin",
    "SeededSamples",
    "build_loader",
    "distributed_world",
    "repeated_samples_per_rank",
    "sample_seed",
    "seed_worker",
]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: distinct, reproducible random streams per worker and per epoch.

    ``torch.initial_seed()`` inside a worker is the loader's per-epoch base seed plus the worker id, drawn from the
    main process's generator, so it follows ``seed_everything`` and differs between epochs and workers.
    It also leaves the preemption signals to the main process (``datamodules/worker_signals.py``).
    """
    leave_preemption_signals_to_the_main_process()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of ``epoch``'s global order (a 32-bit integer).

    The position, not the dataset index, so that the repeats of one image under repeated augmentation are augmented
    differently; it does not depend on the world size, so one process and many augment the same positions alike.
    """
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def distributed_world() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised ``torch.distributed`` group, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def repeated_samples_per_rank(length: int, world: int, selected_round: int = 256) -> int:
    """Samples per rank and epoch under repeated augmentation (timm ``RepeatAugSampler``, DeiT ``RASampler``):
    ``floor(length // selected_round * selected_round / world)``, or ``ceil(length / world)`` for small sets."""
    if selected_round and length >= selected_round:
        return math.floor(length // selected_round * selected_round / world)
    return math.ceil(length / world)


class ResumableSampler(DistributedSampler):
    """Shuffled shard of the training set that yields ``(index, augmentation seed)`` and can skip a consumed prefix.

    Global order of ``epoch``: ``perm = randperm(N)`` seeded with ``seed + epoch`` (the same on every rank). Without
    repeats (``num_repeats=1``) it is ``DistributedSampler``'s: ``perm`` padded to a multiple of the world size ``W``,
    rank ``r`` taking positions ``r, r + W, ...``. With repeats it is timm's ``RepeatAugSampler`` (repeated
    augmentation, Hoffer et al., "Augment your batch", CVPR 2020; DeiT's ``RASampler``): every index of ``perm``
    repeated ``num_repeats`` times in a row, rank ``r`` taking positions ``r, r + W, ...`` (wrapping around) up to
    ``repeated_samples_per_rank(N, W)`` of them, so each repeat of an image lands on another rank and an epoch still
    holds about ``N`` samples. Each sample's augmentation seed is ``sample_seed(seed, epoch, position)``.

    ``skip(epoch, n)`` drops the first ``n`` samples of this rank's shard the next time ``epoch`` is iterated;
    ``len()`` stays the full shard length because Lightning counts batches from the start of the epoch it restores.
    Subclassing ``DistributedSampler`` keeps Lightning from replacing it under DDP.

    Args:
        dataset: the training set.
        seed: the run's loader seed (the same on every rank).
        num_repeats: repeats per image and epoch (DeiT: 3); 1 is plain shuffling; a non-integer repeats a fraction of
            the images once more, as timm's.
        num_replicas: world size (default: torch.distributed's).
        rank: this process's rank (default: torch.distributed's).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        num_repeats: float = 1,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world, this_rank = distributed_world()
        world = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if num_repeats < 1:
            raise ValueError(f"num_repeats={num_repeats} must be >= 1 (1: no repeated augmentation, DeiT: 3)")
        self.num_repeats = num_repeats
        if num_repeats != 1:
            length = len(dataset)  # type: ignore[arg-type]
            self.total_size = math.ceil(length * num_repeats / world) * world
            self.num_samples = min(repeated_samples_per_rank(length, world), self.total_size // world)
        self._skip: tuple[int, int] | None = None

    def skip(self, epoch: int, samples: int) -> None:
        """Drop the first ``samples`` indices of ``epoch`` (once)."""
        self._skip = (epoch, samples) if samples > 0 else None

    def global_order(self) -> list[int]:
        """The epoch's dataset indices in global position order (before padding/wrap-around), the same on every rank."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.dataset), generator=generator)  # type: ignore[arg-type]
        if self.num_repeats == 1:
            return perm.tolist()
        if float(self.num_repeats).is_integer():
            return torch.repeat_interleave(perm, int(self.num_repeats)).tolist()
        size = math.ceil(self.num_repeats * len(perm))
        return perm[torch.tensor([int(i // self.num_repeats) for i in range(size)], dtype=torch.long)].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order = self.global_order()
        positions = range(self.rank, self.total_size, self.num_replicas)[: self.num_samples]
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = self._skip[1], None
        return iter([(order[p % len(order)], sample_seed(self.seed, self.epoch, p)) for p in positions[start:]])


class SeededSamples(Dataset):
    """Wraps a dataset: ``wrapped[(index, seed)]`` reseeds its transform with ``seed``, then returns ``dataset[index]``.

    The wrapped dataset must have ``reseed(seed)`` (the project's datasets reseed their transform's generators with
    it); the global ``random``/``numpy``/``torch`` generators are left alone, so loading in the main process
    (``num_workers=0``) does not disturb the model's random stream.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        self.dataset.reseed(seed)  # type: ignore[attr-defined]
        return self.dataset[index]


def build_loader(
    dataset: Dataset,
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = False,
    collate_fn: Callable[[Sequence[Any]], Any] | None = None,
    seed: int = 0,
    drop_last: bool | None = None,
    num_repeats: float = 1,
    name: str = "the evaluation set",
) -> DataLoader:
    """The project's DataLoader for one split.

    Training: a ``ResumableSampler`` (shuffled, sharded across DDP ranks, ``num_repeats`` repeated augmentation) over
    ``SeededSamples(dataset)``, and by
    default the last ragged batch dropped (mixup/cutmix need an even batch, and a small last batch skews batch
    statistics).
    Evaluation: in order, and under DDP an ``UnpaddedDistributedSampler`` so that every sample is scored once (a
    set, called ``name`` in its error, with fewer samples than ranks is a ``DataError``).
    Either way the loader owns a generator seeded from ``seed``, so creating an iterator never draws from the global
    random stream (a resumed run would otherwise shift the model's dropout and drop-path masks).
    """
    world, _ = distributed_world()
    generator = torch.Generator().manual_seed(seed)
    if train:
        sampler: Any = ResumableSampler(dataset, seed, num_repeats=num_repeats)
        dataset = SeededSamples(dataset)
    else:
        sampler = UnpaddedDistributedSampler(dataset, name=name) if world > 1 else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=seed_worker,
        collate_fn=collate_fn,
        generator=generator,
        drop_last=train if drop_last is None else drop_last,
    )


def _shared_across_ranks(value: int) -> int:
    """Rank 0's ``value`` on every rank: the shuffle must be shared while each rank's random stream is its own."""
    world, _ = distributed_world()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return int(box[0])


class ResumableTrainLoaderMixin:
    """For a ``LightningDataModule``: the training loader's position travels in the checkpoint.

    ``state_dict()`` (called by Lightning when it saves) records the loader seed, the epoch, how many samples of
    this rank's shard the training steps have consumed and the epoch of the next batch; ``load_state_dict()`` (called
    when it restores) makes the next ``train_loader(...)`` start at that epoch and skip them (checkpoints from before
    ``next_epoch`` was recorded: the epoch when they stopped mid-epoch, else Lightning's). Batches prefetched but not
    yet trained on are not counted: the count comes from the trainer's processed-batch counter, not from the loader.
    """

    trainer: Any
    _train_seed: int | None = None
    _train_batch_size: int = 0
    _pending_resume: dict[str, int] | None = None

    def train_loader(self, dataset: Dataset, *, batch_size: int, **kwargs: Any) -> DataLoader:
        """``build_loader(dataset, train=True, ...)`` with the run's loader seed and any restored position applied."""
        resume = self._pending_resume
        if resume is not None:
            self._train_seed = resume["seed"]
        elif self._train_seed is None:
            # NOTE: drawn once from the global stream, so it follows seed_everything; then kept in checkpoints
            self._train_seed = _shared_across_ranks(int(torch.randint(2**31, ()).item()))
        loader = build_loader(dataset, train=True, batch_size=batch_size, seed=self._train_seed, **kwargs)
        if resume is not None:
            next_epoch = resume.get("next_epoch", resume["epoch"] if resume["samples"] else None)
            if next_epoch is not None:
                # NOTE: Lightning iterates the loader once while setting up, before it sets the epoch, and trains on
                # that iterator; with workers it has already drawn the order of the sampler's current epoch
                loader.sampler.set_epoch(next_epoch)  # type: ignore[union-attr]
            loader.sampler.skip(resume["epoch"], resume["samples"])  # type: ignore[union-attr]
            self._pending_resume = None
        self._train_batch_size = batch_size
        return loader

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or self._train_seed is None:
            return {}
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if processed >= trainer.num_training_batches:
            processed = 0  # NOTE: the epoch is complete (a save after it may already carry the next epoch's number)
        return {
            "seed": self._train_seed,
            "epoch": trainer.current_epoch,
            "samples": processed * self._train_batch_size,
            # NOTE: the epoch of the next batch, Lightning's sampler epoch (epochs whose batches all ran)
            "next_epoch": trainer.fit_loop.epoch_progress.current.processed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            keys = [key for key in ("seed", "epoch", "samples", "next_epoch") if key in state_dict]
            self._pending_resume = {key: int(state_dict[key]) for key in keys}


class EvalLoadersMixin:
    """For a ``LightningDataModule`` with ``val_set``, ``setup`` and ``_loader(dataset, train)``: validation, test and
    predict all read the validation split (the test splits of ImageNet, COCO and ADE20K have no public labels)."""

    val_set: Any

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")  # type: ignore[attr-defined]
        return self._loader(self.val_set, train=False)  # type: ignore[attr-defined]

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
