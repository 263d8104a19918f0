"""Sharding shared by every loader (PIL, DALI, the latent cache): the sampler (DistributedSampler
semantics) and the loader base with its epoch counter and batch counts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch

from rectok.data.sources import SampleSet


class ShardedSampler:
    """Per-rank sample order, shared by both backends.

    train=True: permutation of all samples from torch.Generator(seed + epoch), truncated to a
    multiple of world_size (DistributedSampler drop_last semantics), rank takes every
    world_size-th entry from `rank`. train=False: rank takes indices rank, rank + W, ... in
    order: every sample on exactly one rank, no padding.
    """

    def __init__(
        self, num_samples: int, rank: int = 0, world_size: int = 1, train: bool = True, seed: int = 0
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if train and num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} training ranks")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def indices(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.num_samples, self.world_size))
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        total = len(self) * self.world_size
        return perm[self.rank : total : self.world_size].tolist()


# ----------------------------------------------------------------------------- loaders


class Loader(Protocol):
    """What every backend's loader provides."""

    backend: str
    epoch: int
    samples: SampleSet

    @property
    def num_skipped(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...


class ShardedLoader:
    """What the PIL and DALI loaders share: one ShardedSampler, the epoch counter, batch counts.

    Each pass over a loader is one epoch; `set_epoch` chooses the epoch of the next pass
    (for resuming), otherwise it advances by one per pass.
    """

    def __init__(
        self, samples: SampleSet, batch_size: int, train: bool, rank: int, world_size: int, seed: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples, self.batch_size, self.train = samples, batch_size, train
        self.sampler = ShardedSampler(len(samples), rank, world_size, train, seed)
        if train and len(self.sampler) < batch_size:
            raise ValueError(
                f"rank {rank} gets {len(self.sampler)} training samples per epoch, fewer than one batch "
                f"of {batch_size}: lower the batch size or use more data"
            )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _start_epoch(self) -> list[int]:
        """This rank's sample order for the pass that starts now."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.sampler.indices(epoch)
