"""build_loader: one call for every backend ("pil", "dali", "auto")."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rectok.data.pil_loader import PILLoader
from rectok.data.sharding import Loader
from rectok.data.sources import default_exclusion_path, read_exclusion_list, resolve_samples

log = logging.getLogger(__name__)


BACKENDS = ("pil", "dali", "auto")


def _select_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    from rectok.data import dali

    if device.type == "cuda" and dali.dali_available():
        log.info("data backend: DALI (GPU JPEG decoding on %s)", device)
        return "dali"
    why = "no CUDA device" if device.type != "cuda" else "nvidia.dali is not importable"
    log.info("data backend: PIL + torch DataLoader (%s)", why)
    return "pil"


def build_loader(
    source: str | Path,
    *,
    batch_size: int,
    split: str | None = None,
    root: str | Path | None = None,
    image_size: int = 256,
    train: bool = True,
    crop: str = "center",
    hflip: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 4,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    exclude: str | Path | None = "auto",
    spread: int = 0,
) -> Loader:
    """A per-rank loader of {"image" [B,3,S,S] in [-1,1], "label" [B], "index" [B]} batches.

    source/split/root: see resolve_samples. batch_size is per rank. train=True: shuffled each
    epoch, random flips (unless hflip=False), incomplete last batch dropped; train=False:
    fixed order, no flips, every sample read exactly once over all ranks (last batch partial).
    backend: "pil", "dali" or "auto" (DALI when importable and `device` is CUDA). exclude:
    exclusion list from verify_dataset ("auto": the default path if the file exists). spread: only
    that many samples, evenly spread over the set (SampleSet.spread; 0 = all).
    """
    device = torch.device(device)
    samples = resolve_samples(source, split, root)
    exclusion_file = default_exclusion_path(source, split) if exclude == "auto" else exclude
    excluded: set[str] = set()
    if exclusion_file is not None and Path(exclusion_file).is_file():
        excluded = read_exclusion_list(exclusion_file)
        samples = samples.without(excluded)
        log.info("excluding %d files listed in %s", len(excluded), exclusion_file)
    elif exclude not in ("auto", None):
        raise FileNotFoundError(
            f"exclusion list not found: {exclude} (make it with `python -m rectok.data verify`)"
        )
    samples = samples.spread(spread)
    chosen = _select_backend(backend, device)
    common = dict(
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        crop=crop,
        hflip=hflip,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    if chosen == "dali":
        from rectok.data.dali import DALILoader

        if not excluded:
            log.warning(
                "DALI stops at the first file it cannot decode and no exclusion list was found (%s); run "
                "`python -m rectok.data verify %s` once to scan the dataset",
                exclusion_file,
                source,
            )
        return DALILoader(samples, num_threads=max(num_workers, 1), device=device, **common)
    return PILLoader(samples, num_workers=num_workers, pin_memory=device.type == "cuda", **common)
