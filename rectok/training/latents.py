"""The frozen tokenizer's latents for the DiT^DH stage: per-channel statistics over the training set
(SPEC section 6) and an optional cache of every image's posterior moments, so that a step does not
have to run the encoder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rectok.checkpoints.loading import tokenizer_fingerprint
from rectok.checkpoints.store import atomic_write, remove_temp_files
from rectok.data.sharding import ShardedLoader
from rectok.data.sources import SampleSet
from rectok.training import distributed as D
from rectok.training.batches import encode_loader, stats_loader
from rectok.training.config import TrainConfig
from rectok.training.runtime import Run

log = logging.getLogger(__name__)


class ChannelStats:
    """Running per-channel sum, sum of squares and count of the posterior mean in float64 (a float32
    sum over ~300M ImageNet tokens would lose the mean's low digits); shared by train.py and
    `python -m rectok.training.latent_stats`."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.acc = torch.zeros(2 * channels + 1, dtype=torch.float64, device=device)  # sum, sum sq, count

    def update(self, moments: torch.Tensor) -> None:
        """moments: (B, L, >= C) encoder output; its first C channels are the posterior mean."""
        C = self.channels
        mean = moments[..., :C].double().reshape(-1, C)  # (B * L, C)
        self.acc[:C] += mean.sum(0)
        self.acc[C : 2 * C] += mean.square().sum(0)
        self.acc[-1] += mean.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean, std) float32 [C] and the number of latent vectors, summed over all ranks."""
        C, acc = self.channels, D.all_reduce_sum_(self.acc.clone())
        count = int(acc[-1].item())
        if count == 0:
            raise ValueError("no latent vectors were accumulated: the data yielded no readable images")
        mu = acc[:C] / acc[-1]
        std = (acc[C : 2 * C] / acc[-1] - mu.square()).clamp_min(1e-12).sqrt()
        return mu.float(), std.float(), count


@torch.no_grad()
def channel_statistics(
    tok: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    autocast=nullcontext,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std) float32 [C] of the posterior mean over `batches` on every rank, and the number
    of images; `autocast` makes the encoder's precision context. The one loop behind the DiT^DH
    stage's statistics and `python -m rectok.training.latent_stats`."""
    stats = ChannelStats(tok.cfg.token_channels, device)
    for batch in tqdm(batches, desc="latent stats", unit="batch", disable=not progress):
        with autocast():
            stats.update(tok.encoder(batch["image"].to(device, non_blocking=True)))
    mean, std, count = stats.finish()
    return mean, std, count // tok.cfg.seq_len


def latent_statistics(tok: nn.Module, cfg: TrainConfig, run: Run, root: Path) -> dict:
    """Per-channel mean and std [C] of the posterior mean over the train split (no flip, center crop;
    --data.stats_images evenly spread images, 0 = all), accumulated in float64 over all ranks (SPEC
    section 6), as {"mean", "std", "images", "tokenizer_fingerprint"}: the entry a tokenizer's final
    checkpoint carries. Collective. Runs under fork_rng: the loader's seed draw must not move the
    training RNG that the checkpoint records."""
    with torch.random.fork_rng(devices=[]):
        loader = stats_loader(cfg, run, root, tok.cfg.img_size)
        mu, std, images = channel_statistics(tok, loader, run.device, run.autocast)
    return {
        "mean": mu.cpu(),
        "std": std.cpu(),
        "images": images,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
    }


class CachedMoments(ShardedLoader):
    """Posterior moments cached once per training image, plain and flipped, in a float16 .npy
    [N, 2, L, 2C]. A loader like the image loaders (same ShardedLoader base: sampler, epochs,
    batch counts), so batches follow the image loader's order, and a sample is flipped exactly when
    the image loader would flip it (rng(seed, epoch, index) draws first): training sees the same
    distribution as encoding every step."""

    backend = "latent-cache"
    num_skipped = 0  # unreadable images were replaced when the cache was built (_fill_unreadable_rows)

    def __init__(
        self,
        path: Path,
        samples: SampleSet,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hflip: bool,
    ) -> None:
        super().__init__(samples, batch_size, True, rank, world_size, seed)
        self.moments = np.load(path, mmap_mode="r")
        self.labels = torch.tensor(samples.labels, dtype=torch.int64)
        self.seed, self.hflip = seed, hflip

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        idx = self._start_epoch()
        for b in range(len(idx) // self.batch_size):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            flips = [
                int(self.hflip and np.random.default_rng([self.seed, epoch, i]).random() < 0.5) for i in chunk
            ]
            moments = torch.from_numpy(
                np.stack([self.moments[i, f] for i, f in zip(chunk, flips)]).astype(np.float32)
            )
            yield {"moments": moments, "label": self.labels[chunk]}


def latent_cache_tag(tok: nn.Module, root: Path, fingerprint: str | None = None) -> str:
    """Names a cache by what its contents depend on: the tokenizer's weights (its fingerprint), its
    input size and the image folder, so identical runs share a cache and a new tokenizer never reads
    a stale one (USERS.md item 12)."""
    fingerprint = fingerprint or tokenizer_fingerprint(tok)
    key = f"{Path(root).resolve()}|{tok.cfg.img_size}|{fingerprint}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


CACHE_FORMAT = 1  # bump when the layout of moments_<tag>.npy changes


def cache_paths(cache_dir: Path, tag: str) -> tuple[Path, Path, Path]:
    """(the finished cache, the file an unfinished build writes into, its completion record)."""
    return (
        cache_dir / f"moments_{tag}.npy",
        cache_dir / f"moments_{tag}.npy.partial",
        cache_dir / f"moments_{tag}.done",
    )


def cache_problem(path: Path, marker: Path, shape: tuple[int, ...]) -> str | None:
    """Why the cache at `path` must not be read (None when it is complete): no completion record, a
    record that does not parse or describes another layout, a missing file, or a file whose size or
    .npy header differs from what the record and this run expect (truncated, overwritten)."""
    if not marker.is_file():
        return None if not path.exists() else "it has no completion record (an interrupted build?)"
    try:
        record = json.loads(marker.read_text())
        expected_bytes = int(record["bytes"])
        recorded_shape = tuple(record["shape"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its completion record {marker.name} is unreadable ({type(err).__name__}: {err})"
    if record.get("format") != CACHE_FORMAT or recorded_shape != shape:
        return (
            f"it was built for shape {recorded_shape} (format {record.get('format')}), this run needs {shape}"
        )
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != expected_bytes:
        return f"{path.name} is {path.stat().st_size} bytes, its record says {expected_bytes} (truncated?)"
    try:
        on_disk = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        return f"{path.name} does not open as .npy ({err})"
    if on_disk.shape != shape or on_disk.dtype != np.float16:
        return f"{path.name} holds {on_disk.dtype}{on_disk.shape}, expected float16{shape}"
    return None


@torch.no_grad()
def build_latent_cache(tok: nn.Module, cfg: TrainConfig, run: Run, root: Path, tag: str) -> Path:
    """Encode every training image once (plain and flipped) into cache_dir/moments_<tag>.npy and return
    that path; a complete cache (its record and file agree, see cache_problem) is reused as is.

    Crash safety: the build writes moments_<tag>.npy.partial (ranks fill disjoint rows of one
    memory-mapped file), which is renamed to .npy only once every row is written, and then the
    completion record moments_<tag>.done is written atomically; a reader never sees a half-written
    cache. An interrupted build (a .partial left, or a .npy without a valid record) is rebuilt from
    the start with a warning. Rows of unreadable images are filled with the next readable image's
    moments, the substitute the image loader would use, and counted in the record."""
    cache_dir = Path(cfg.dit.cache_dir or run.run_dir / "latent_cache")
    path, partial, marker = cache_paths(cache_dir, tag)
    loader = encode_loader(cfg, run, root, tok.cfg.img_size)
    n, L, C2 = len(loader.samples), tok.cfg.seq_len, 2 * tok.cfg.token_channels
    shape = (n, 2, L, C2)
    problem = cache_problem(path, marker, shape) if run.info.is_main else None
    reuse = D.broadcast_object(marker.is_file() and problem is None if run.info.is_main else None)
    if reuse:
        run.print(f"latent cache: reusing {path} ({n} images)")
        return path
    if run.info.is_main:
        if problem is not None or partial.exists():
            why = problem or f"{partial.name} was left by an interrupted build"
            log.warning("latent cache %s cannot be used: %s; rebuilding it", path, why)
        for stale in (marker, path):
            stale.unlink(missing_ok=True)
        remove_temp_files(cache_dir)  # of an interrupted record write
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape).flush()
    D.barrier()
    out = np.load(partial, mmap_mode="r+")
    for batch in loader:
        x = batch["image"].to(run.device)
        with run.autocast():
            both = torch.stack([tok.encoder(x), tok.encoder(x.flip(-1))], 1)  # (B, 2, L, 2C)
        out[batch["index"].numpy()] = both.float().cpu().numpy().astype(np.float16)
    out.flush()
    del out
    bad = sorted(set().union(*map(set, D.all_gather_object(sorted(getattr(loader, "bad_indices", ()))))))
    D.barrier()
    if run.info.is_main:
        if bad:
            _fill_unreadable_rows(partial, bad, n)
            log.warning(
                "latent cache: %d unreadable image(s) got the next readable image's moments", len(bad)
            )
        size = partial.stat().st_size
        os.replace(partial, path)
        record = {"format": CACHE_FORMAT, "shape": list(shape), "bytes": size, "unreadable": len(bad)}
        atomic_write(marker, lambda f: f.write(json.dumps(record).encode()))
        run.print(f"latent cache: wrote {path} ({n} images, {size / 2**20:.1f} MiB)")
    D.barrier()
    return path


def _fill_unreadable_rows(path: Path, bad: list[int], n: int) -> None:
    """Give each unreadable image's row the moments of the next readable index (cyclically), as the
    image loader substitutes the next readable file."""
    bad_set = set(bad)
    if len(bad_set) >= n:
        raise ValueError(f"none of the {n} training images could be read: nothing to cache")
    rows = np.load(path, mmap_mode="r+")
    for i in bad:
        j = (i + 1) % n
        while j in bad_set:
            j = (j + 1) % n
        rows[i] = rows[j]
    rows.flush()
    del rows
