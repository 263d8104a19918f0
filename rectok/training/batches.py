"""Data of a training run: the dataset folder, its loaders and held-out images, and the
micro-batches of every optimizer step (resumable mid-epoch without moving the global RNG)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rectok.data.dataset import ImageDataset
from rectok.data.loading import build_loader
from rectok.data.sources import resolve_samples
from rectok.training import distributed as D
from rectok.training.config import TrainConfig
from rectok.training.progress import Position, Schedule
from rectok.training.runtime import Run


def data_root(cfg: TrainConfig, run: Run) -> Path:
    """The dataset folder; "demo" builds the demo dataset under data/demo (rank 0, once)."""
    if cfg.data.path != "demo":
        return Path(cfg.data.path)
    root = Path("data/demo")
    if run.info.is_main:
        from rectok.data.demo import ensure_demo_dataset

        ensure_demo_dataset(root)
    D.barrier()
    return root


def _split(root: Path, name: str) -> str | None:
    return name if (root / name).is_dir() else None


def held_out_split(root: Path) -> str | None:
    """The split held-out images come from: val, or the train split when there is none."""
    return _split(root, "val") or _split(root, "train")


def train_loader(cfg: TrainConfig, run: Run, root: Path, image_size: int):
    """This rank's shard of the train split: --data.crop crops (ADM center crops by default) and
    random flips, reshuffled every epoch."""
    return _shard_of_train_split(cfg, run, root, image_size, train=True)


def encode_loader(cfg: TrainConfig, run: Run, root: Path, image_size: int):
    """This rank's shard of the train split in order: center crop, no flip (the latent cache)."""
    return _shard_of_train_split(cfg, run, root, image_size, train=False)


def stats_loader(cfg: TrainConfig, run: Run, root: Path, image_size: int):
    """As encode_loader, over --data.stats_images images evenly spread over the train split (the
    latent statistics: every class, not the first few of a class-sorted folder)."""
    return _shard_of_train_split(cfg, run, root, image_size, train=False, spread=cfg.data.stats_images)


def _shard_of_train_split(
    cfg: TrainConfig, run: Run, root: Path, image_size: int, train: bool, spread: int = 0
):
    return build_loader(
        root,
        split=_split(root, "train"),
        batch_size=cfg.micro_batch,
        image_size=image_size,
        train=train,
        crop=cfg.data.crop if train else "center",
        hflip=cfg.data.hflip and train,
        rank=run.info.rank,
        world_size=run.info.world_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        backend="auto",
        device=run.device,
        spread=spread,
    )


@dataclass
class HeldOut:
    """The held-out images and the picks that could not be read (dropped, not replaced, so that every
    run on this dataset keeps evaluating the same images)."""

    images: torch.Tensor  # [N, 3, S, S] in [-1, 1], N = the picks that decoded
    skipped: list[tuple[str, str]]  # (relative path, reason) of each unreadable pick
    root: Path

    def warning(self, shown: int = 3) -> str | None:
        """A one-line warning naming the first `shown` skipped files and why, or None if none was."""
        if not self.skipped:
            return None
        names = "; ".join(f"{rel} ({why})" for rel, why in self.skipped[:shown])
        more = f"; and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return (
            f"warning: {len(self.skipped)} unreadable held-out image(s) under {self.root} skipped, "
            f"evaluating on {len(self.images)}: {names}{more}"
        )


def held_out_images(count: int, root: Path, image_size: int) -> HeldOut:
    """`count` images spread evenly over the val split (train split if there is none), center
    crop, no flip, [-1, 1]: the same images for every run on this dataset. Unreadable picks are
    dropped and listed in `skipped`; none readable at all is an error."""
    samples = resolve_samples(root, held_out_split(root))
    dataset = ImageDataset(samples, image_size=image_size, crop="center", hflip=False, on_error="drop")
    picks = np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int)
    images, skipped = [], []
    for i in picks:
        item = dataset[int(i)]
        if "image" in item:
            images.append(item["image"])
        else:
            skipped.append((samples.relpaths[int(i)], dataset.errors.get(int(i), "unreadable")))
    if not images:
        raise ValueError(
            f"none of the {len(picks)} held-out images under {samples.root} could be read (first: "
            f"{skipped[0][0]}: {skipped[0][1]}); run `python -m rectok.data verify` on the dataset"
        )
    return HeldOut(torch.stack(images), skipped, samples.root)


def bad_image_indices(loader) -> list[int]:
    """Distinct unreadable training files `loader` met (and substituted) in this run, resumed parts
    included (restore_bad_images), over all ranks. A union, not a sum: with a fresh permutation every
    epoch the same bad file can reach several ranks. Collective: every rank must call it. The DALI
    loader and the latent cache have no `bad_indices` (their bad files are dealt with before the run),
    so they contribute none."""
    mine = sorted(getattr(loader, "bad_indices", ()))
    return sorted(set().union(*map(set, D.all_gather_object(mine))))


def restore_bad_images(loader, state: dict) -> None:
    """On resume: the unreadable files the run met before it was interrupted (checkpoint entry
    "bad_images"), so that metrics.json counts the whole run, not the part since the restart."""
    if hasattr(loader, "bad_indices"):
        loader.bad_indices.update(int(i) for i in state.get("bad_images", ()))


def skipped_training_images(loader) -> int:
    """How many distinct unreadable training files the run met (collective; see bad_image_indices)."""
    return len(bad_image_indices(loader))


class _SkipFirst:
    """A ShardedSampler view without its first n indices (resume mid-epoch without decoding them)."""

    def __init__(self, sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def indices(self, epoch: int) -> list[int]:
        return self.sampler.indices(epoch)[self.n :]

    def __len__(self) -> int:
        return len(self.sampler) - self.n


def epoch_batches(loader, epoch: int, skip: int) -> Iterator[dict]:
    """Batches of `epoch`, starting at batch `skip`. Data loading runs under fork_rng so that it
    never moves the global RNG (torch's DataLoader draws a seed per iterator), which keeps
    resumed runs bit-identical."""
    loader.set_epoch(epoch)
    original = getattr(loader, "sampler", None)
    fast = skip > 0 and hasattr(original, "indices") and hasattr(loader, "batch_size")
    if fast:  # PIL / cached loaders: leave out the consumed samples instead of decoding them
        loader.sampler = _SkipFirst(original, skip * loader.batch_size)
    try:
        it = iter(loader)
        for _ in range(0 if fast else skip):
            with torch.random.fork_rng(devices=[]):
                next(it)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                return
            yield batch
    finally:
        if fast:
            loader.sampler = original


def step_batches(loader, sched: Schedule, pos: Position) -> Iterator[Iterator[dict]]:
    """For every optimizer step until `sched.total`, the iterator its `sched.accum` micro-batches
    come from; the caller takes them and advances pos.batch (per micro-batch) and pos.step.

    Starts at (pos.epoch, pos.batch), so a resumed run continues where it stopped. An epoch ends
    when fewer than `accum` of its micro-batches are left (those are dropped)."""
    per_epoch = sched.steps_per_epoch * sched.accum
    while pos.step < sched.total:
        batches = epoch_batches(loader, pos.epoch, pos.batch)
        while pos.step < sched.total and pos.batch + sched.accum <= per_epoch:
            yield batches
        if pos.batch + sched.accum > per_epoch:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        batches.close()
