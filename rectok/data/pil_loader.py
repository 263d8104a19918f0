"""PIL decoding in torch DataLoader workers; unreadable files are counted and logged once."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from rectok.data.dataset import ImageDataset, collate
from rectok.data.sharding import ShardedLoader
from rectok.data.sources import SampleSet

log = logging.getLogger(__name__)


class PILLoader(ShardedLoader):
    """Batches of {"image", "label", "index"} through a torch DataLoader (PIL decoding).

    Each pass over the loader is one epoch; `set_epoch` chooses the epoch of the next pass
    (for resuming), otherwise it advances by one per pass.
    """

    backend = "pil"

    def __init__(
        self,
        samples: SampleSet,
        *,
        batch_size: int,
        image_size: int = 256,
        train: bool = True,
        crop: str = "center",
        hflip: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 4,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(samples, batch_size, train, rank, world_size, seed)
        self.dataset = ImageDataset(
            samples,
            image_size=image_size,
            crop=crop,
            hflip=train if hflip is None else hflip,
            seed=seed,
            on_error="substitute" if train else "drop",
        )
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.bad_indices: set[int] = set()

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far (skipped and logged)."""
        return len(self.bad_indices)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        keys = [(epoch, i) for i in self._start_epoch()]
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=keys,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            drop_last=self.train,
            persistent_workers=False,
        )
        for batch in loader:
            for i in batch.pop("bad"):
                if i not in self.bad_indices:
                    self.bad_indices.add(i)
                    log.warning(
                        "skipping unreadable image %s (%d skipped so far)",
                        self.samples.path(i),
                        len(self.bad_indices),
                    )
            if batch["image"] is not None:
                yield batch
