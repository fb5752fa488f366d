"""Samplers that keep distributed evaluation exact."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

from core.errors import DataError

__all__ = ["UnpaddedDistributedSampler"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards a dataset across ranks in order, without padding: every sample is seen exactly once.

    ``torch.utils.data.DistributedSampler`` pads the index list to a multiple of the world size, so distributed
    validation counts some samples twice (torchvision #4559). Here rank ``r`` gets indices ``r, r + W, r + 2W, ...``;
    ranks may then run one batch more or less than others, which evaluation tolerates (metrics are synchronised once
    at the end, not per step). Subclassing ``DistributedSampler`` keeps Lightning from replacing it.

    A dataset smaller than the world size is a one-line ``DataError`` naming it (``name``): a rank without a sample
    would skip the evaluation loop, and with it the collectives the other ranks wait in.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        name: str = "the evaluation set",
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)  # type: ignore[arg-type]
        if size < self.num_replicas:
            fix = f"evaluate on at most {size} ranks (--trainer.devices, --trainer.num_nodes) or " if size else ""
            raise DataError(
                f"{name} has {size} samples, fewer than the {self.num_replicas} DDP ranks (a rank without one would "
                f"skip evaluation while the others wait for it): {fix}add samples to it"
            )
        self.num_samples = len(range(self.rank, size, self.num_replicas))
        self.total_size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
