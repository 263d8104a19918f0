"""The frozen tokenizer's latents for the DiT^DH stage: per-channel statistics over the training set
(SPEC section 6) and an optional cache of every image's posterior moments, so that a step does not
have to run the encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rectok import distributed as D
from rectok.data import ShardedSampler
from rectok.train_config import TrainConfig
from rectok.training.batches import encode_loader
from rectok.training.runtime import Run


class ChannelStats:
    """Running per-channel sum, sum of squares and count of the posterior mean in float64 (a float32
    sum over ~300M ImageNet tokens would lose the mean's low digits); shared by train.py and
    `python -m rectok.latent_stats`."""

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
def latent_statistics(
    tok: nn.Module, cfg: TrainConfig, run: Run, root: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [C] of the posterior mean over the training set (no flip, center crop),
    accumulated in float64 over all ranks (SPEC section 6)."""
    loader = encode_loader(cfg, run, root, tok.cfg.img_size)
    stats = ChannelStats(tok.cfg.token_channels, run.device)
    for i, batch in enumerate(loader):
        if cfg.dit.stats_batches and i >= cfg.dit.stats_batches:
            break
        with run.autocast():
            stats.update(tok.encoder(batch["image"].to(run.device)))
    mu, std, _ = stats.finish()
    return mu, std


class CachedMoments:
    """Posterior moments cached once per training image, plain and flipped, in a float16 .npy
    [N, 2, L, 2C]. Batches follow the image loader's ShardedSampler order, and a sample is flipped
    exactly when the image loader would flip it (rng(seed, epoch, index) draws first), so training
    sees the same distribution as encoding every step."""

    def __init__(
        self,
        path: Path,
        labels: list[int],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hflip: bool,
    ) -> None:
        self.moments = np.load(path, mmap_mode="r")
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.sampler = ShardedSampler(len(labels), rank, world_size, True, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        idx = self.sampler.indices(epoch)
        for b in range(len(idx) // self.batch_size):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            flips = [
                int(self.hflip and np.random.default_rng([self.seed, epoch, i]).random() < 0.5) for i in chunk
            ]
            moments = torch.from_numpy(
                np.stack([self.moments[i, f] for i, f in zip(chunk, flips)]).astype(np.float32)
            )
            yield {"moments": moments, "label": self.labels[chunk]}


def latent_cache_tag(tok: nn.Module, root: Path) -> str:
    """Names a cache by what its contents depend on: the tokenizer's weights (bytes, in key order),
    its input size and the image folder, so identical runs share a cache and a new tokenizer never
    reads a stale one (USERS.md item 12)."""
    digest = hashlib.sha256(f"{Path(root).resolve()}|{tok.cfg.img_size}".encode())
    for name, tensor in sorted(tok.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def build_latent_cache(tok: nn.Module, cfg: TrainConfig, run: Run, root: Path, tag: str) -> Path:
    """Encode every training image once (plain and flipped) into cache_dir/moments_<tag>.npy; ranks write
    disjoint rows of one memory-mapped file. Reused when complete (marker file)."""
    cache_dir = Path(cfg.dit.cache_dir or run.run_dir / "latent_cache")
    path, marker = cache_dir / f"moments_{tag}.npy", cache_dir / f"moments_{tag}.done"
    if marker.is_file():
        return path
    loader = encode_loader(cfg, run, root, tok.cfg.img_size)
    n, L, C2 = len(loader.samples), tok.cfg.seq_len, 2 * tok.cfg.token_channels
    if run.info.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 2, L, C2)).flush()
    D.barrier()
    out = np.load(path, mmap_mode="r+")
    for batch in loader:
        x = batch["image"].to(run.device)
        with run.autocast():
            both = torch.stack([tok.encoder(x), tok.encoder(x.flip(-1))], 1)  # (B, 2, L, 2C)
        out[batch["index"].numpy()] = both.float().cpu().numpy().astype(np.float16)
    out.flush()
    del out
    D.barrier()
    if run.info.is_main:
        marker.write_text(json.dumps({"images": n, "tokens": L, "channels": C2}))
    D.barrier()
    return path
