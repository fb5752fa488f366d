"""Samplers that keep distributed evaluation exact."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["UnpaddedDistributedSampler"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards a dataset across ranks in order, without padding: every sample is seen exactly once.

    ``torch.utils.data.DistributedSampler`` pads the index list to a multiple of the world size, so distributed
    validation counts some samples twice (torchvision #4559). Here rank ``r`` gets indices ``r, r + W, r + 2W, ...``;
    ranks may then run one batch more or less than others, which evaluation tolerates (metrics are synchronised once
    at the end, not per step). Subclassing ``DistributedSampler`` keeps Lightning from replacing it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
