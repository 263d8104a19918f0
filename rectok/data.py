"""Image datasets and loaders for tokenizer training and evaluation (SPEC section 5).

Sources: an ImageNet folder (`root/<split>/<wnid>/*.JPEG`, class index = sorted wnid order)
or a file list (one `relpath label` per line, relative to a root). Images go through ADM's
`center_crop_arr` (or RandomResizedCrop), an optional random horizontal flip, and come out as
float32 NCHW in [-1, 1]. Batches are dicts: image [B, 3, S, S], label [B] int64, index [B] int64
(the sample's position in the source, for exact evaluation bookkeeping).

Two backends share one sampler, so they visit the same samples in the same order:
- "pil": PIL decoding in torch DataLoader workers (this file). Corrupt or truncated files
  never stop a run: training substitutes the next readable sample, evaluation drops the
  sample; either way the file is counted (`loader.num_skipped`) and logged once.
- "dali": NVIDIA DALI (rectok/dali_pipeline.py), GPU JPEG decoding. DALI cannot skip a file
  it fails to decode, so run `python -m rectok.data verify ROOT` once: it writes the exclusion
  list that both backends honour.

Sharding follows DistributedSampler: training draws a fresh permutation from `seed + epoch`
every epoch and gives every rank the same number of samples (the tail is dropped); evaluation
(`train=False`) gives each sample to exactly one rank, without padding duplicates, so ranks
may hold one sample more or less than each other.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CROPS = ("center", "random_resized")
BACKENDS = ("pil", "dali", "auto")
# The retry budget of training substitution: a run whose data is mostly unreadable should
# stop with an error instead of looping.
MAX_CONSECUTIVE_BAD = 64


# ----------------------------------------------------------------------------- sources


@dataclass
class SampleSet:
    """Where the images are: `root / relpaths[i]` has class `labels[i]` (-1 when unlabelled)."""

    root: Path
    relpaths: list[str]
    labels: list[int]
    classes: list[str] | None = None  # wnids of a folder dataset, None for file lists

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpaths[i])

    def without(self, excluded: set[str]) -> SampleSet:
        """A copy without the relative paths in `excluded` (e.g. from verify_dataset)."""
        keep = [i for i, p in enumerate(self.relpaths) if p not in excluded]
        return SampleSet(
            self.root, [self.relpaths[i] for i in keep], [self.labels[i] for i in keep], self.classes
        )


def scan_image_folder(folder: str | Path) -> SampleSet:
    """Index `folder/<class>/<file>` (ImageNet layout); class index = sorted class-folder order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image files>")
    relpaths, labels = [], []
    for label, wnid in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(folder / wnid):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS):
                    relpaths.append(os.path.relpath(os.path.join(dirpath, name), folder))
                    labels.append(label)
    if not relpaths:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    return SampleSet(folder, relpaths, labels, classes)


def read_file_list(file_list: str | Path, root: str | Path | None = None) -> SampleSet:
    """Parse a file list: `relpath label` per line (label optional -> -1); blank and # lines skipped.

    Paths are relative to `root` (default: the file list's own folder).
    """
    file_list = Path(file_list)
    if not file_list.is_file():
        raise FileNotFoundError(f"file list not found: {file_list}")
    root = Path(root) if root is not None else file_list.parent
    relpaths, labels = [], []
    for lineno, line in enumerate(file_list.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            relpaths.append(parts[0])
            labels.append(int(parts[1]))
        else:  # no label column (paths may contain spaces)
            relpaths.append(line)
            labels.append(-1)
        if os.path.isabs(relpaths[-1]):
            raise ValueError(
                f"{file_list}:{lineno}: paths must be relative to the root ({root}), got {line!r}"
            )
    if not relpaths:
        raise ValueError(f"file list {file_list} is empty")
    return SampleSet(root, relpaths, labels, None)


def resolve_samples(
    source: str | Path, split: str | None = None, root: str | Path | None = None
) -> SampleSet:
    """A SampleSet from a folder (`source/split/<class>/...`, or `source/<class>/...` when split is
    None) or a file list (`source` is a file; paths relative to `root`, default its folder)."""
    source = Path(source)
    if source.is_file():
        return read_file_list(source, root)
    if not source.exists():
        raise FileNotFoundError(f"dataset not found: {source} (expected a folder or a file list)")
    if split is not None:
        if not (source / split).is_dir():
            raise FileNotFoundError(
                f"split folder not found: {source / split} (ImageNet layout: ROOT/{split}/<wnid>/)"
            )
        source = source / split
    return scan_image_folder(source)


def default_exclusion_path(source: str | Path, split: str | None = None) -> Path:
    """Where verify_dataset writes its exclusion list by default: beside the split folder
    (`ROOT/<split>.exclude.txt`) or beside the file list (`LIST.exclude.txt`)."""
    source = Path(source)
    if source.is_file():
        return source.with_name(source.name + ".exclude.txt")
    if split is not None:
        return source / f"{split}.exclude.txt"
    return source.with_name(source.name + ".exclude.txt")


def read_exclusion_list(path: str | Path) -> set[str]:
    """Relative paths listed one per line (# comments allowed)."""
    lines = Path(path).read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


# ----------------------------------------------------------------------------- transforms


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion image_datasets.py), as used by the RecTok release.

    Halve with a box filter while the short side is >= 2 * image_size (cheap, alias-free
    downscaling), bicubic-resize so the short side is image_size (Python round for the long
    side), then crop the center (floor offsets).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    w, h = pil_image.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def random_resized_crop(
    pil_image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomResizedCrop box sampling (10 tries, then a clamped center crop),
    resized with BICUBIC like the center crop."""
    width, height = pil_image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    box = (left, top, left + w, top + h)
    return pil_image.resize((image_size, image_size), resample=Image.BICUBIC, box=box)


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(pil_image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_rgb(path: str) -> Image.Image:
    """Fully decode an image as RGB (raises on truncated or non-image files)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


# ----------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """Decodes and augments one sample. Keys are sample indices or (epoch, index) pairs (from
    ShardedSampler), so augmentation randomness depends only on (seed, epoch, index), not on
    worker count or timing.

    Unreadable files: `on_error="substitute"` (training) returns the next readable sample;
    `"drop"` (evaluation) returns None, which `collate` removes. Either way the sample carries
    the indices of the bad files it met, so the loader can count them in the main process.
    """

    def __init__(
        self,
        samples: SampleSet,
        image_size: int = 256,
        crop: str = "center",
        hflip: bool = False,
        seed: int = 0,
        on_error: str = "substitute",
    ) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if on_error not in ("substitute", "drop"):
            raise ValueError(f"on_error must be 'substitute' or 'drop', got {on_error!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.samples, self.image_size, self.crop, self.hflip = samples, image_size, crop, hflip
        self.seed, self.on_error = seed, on_error
        self.num_skipped = 0  # bad files met in this process (workers keep their own count)
        # Why each bad file failed, in this process: callers that decode in the main process (the
        # held-out images) report the reason, which the index alone does not give.
        self.errors: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, epoch, index])
        img = load_rgb(self.samples.path(index))
        if self.crop == "center":
            img = center_crop_arr(img, self.image_size)
        else:
            img = random_resized_crop(img, self.image_size, rng)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": to_tensor(img), "label": self.samples.labels[index], "index": index}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad: list[int] = []
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self))):
            i = (index + attempt) % len(self)
            try:
                sample = self._load(i, epoch)
            except Exception as err:  # any decode failure: truncated, not an image, bad mode
                log.debug("unreadable image %s: %s", self.samples.path(i), err)
                bad.append(i)
                self.num_skipped += 1
                self.errors[i] = f"{type(err).__name__}: {err}"
                if self.on_error == "drop":
                    return {"bad": bad}
                continue
            sample["bad"] = bad
            return sample
        raise RuntimeError(
            f"{len(bad)} consecutive unreadable images from {self.samples.path(index)}: is "
            f"{self.samples.root} the right dataset? Run `python -m rectok.data verify` to list them."
        )


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable samples; keep the indices of the bad files met."""
    good = [it for it in items if "image" in it]
    bad = [i for it in items for i in it["bad"]]
    if not good:
        return {"image": None, "label": None, "index": None, "bad": bad}
    return {
        "image": torch.stack([it["image"] for it in good]),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.int64),
        "bad": bad,
    }


# ----------------------------------------------------------------------------- sharding


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
    def num_samples(self) -> int: ...
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

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (before dropping an incomplete training batch)."""
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _start_epoch(self) -> list[int]:
        """This rank's sample order for the pass that starts now."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.sampler.indices(epoch)


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


def _select_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    from rectok import dali_pipeline

    if device.type == "cuda" and dali_pipeline.dali_available():
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
) -> Loader:
    """A per-rank loader of {"image" [B,3,S,S] in [-1,1], "label" [B], "index" [B]} batches.

    source/split/root: see resolve_samples. batch_size is per rank. train=True: shuffled each
    epoch, random flips (unless hflip=False), incomplete last batch dropped; train=False:
    fixed order, no flips, every sample read exactly once over all ranks (last batch partial).
    backend: "pil", "dali" or "auto" (DALI when importable and `device` is CUDA). exclude:
    exclusion list from verify_dataset ("auto": the default path if the file exists).
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
        from rectok.dali_pipeline import DALILoader

        if not excluded:
            log.warning(
                "DALI stops at the first file it cannot decode and no exclusion list was found (%s); run "
                "`python -m rectok.data verify %s` once to scan the dataset",
                exclusion_file,
                source,
            )
        return DALILoader(samples, num_threads=max(num_workers, 1), device=device, **common)
    return PILLoader(samples, num_workers=num_workers, pin_memory=device.type == "cuda", **common)


# ----------------------------------------------------------------------------- verification


def _check_file(path: str) -> str | None:
    """None if PIL can verify and fully decode the file, else the error message."""
    try:
        with Image.open(path) as im:
            im.verify()  # structural check (catches e.g. broken PNG chunks)
        load_rgb(path)  # verify() does not decode JPEG data: truncation shows up only here
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def verify_dataset(
    source: str | Path,
    split: str | None = None,
    root: str | Path | None = None,
    out: str | Path | None = "auto",
    num_workers: int | None = None,
) -> list[str]:
    """Scan every image with PIL (verify + full decode); return the relative paths of the bad ones.

    out: where to write the exclusion list ("auto": default_exclusion_path; None: don't write).
    The file is written atomically, even when empty, so a clean scan is recorded too.
    """
    samples = resolve_samples(source, split, root)
    paths = [samples.path(i) for i in range(len(samples))]
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 16)
    if workers <= 1:
        errors = [_check_file(p) for p in paths]
    else:
        with ProcessPoolExecutor(workers) as pool:
            errors = list(pool.map(_check_file, paths, chunksize=64))
    bad = [rel for rel, err in zip(samples.relpaths, errors) if err is not None]
    for rel, err in zip(samples.relpaths, errors):
        if err is not None:
            log.warning("unreadable image %s: %s", rel, err)
    log.info("verified %d images under %s: %d unreadable", len(paths), samples.root, len(bad))
    if out is not None:
        out_path = default_exclusion_path(source, split) if out == "auto" else Path(out)
        tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
        header = f"# unreadable images under {samples.root} (relative paths), from rectok.data verify\n"
        tmp.write_text(header + "".join(rel + "\n" for rel in bad))
        os.replace(tmp, out_path)
        log.info("wrote exclusion list %s", out_path)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rectok.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ver = sub.add_parser("verify", help="scan a dataset with PIL and write the exclusion list used by DALI")
    ver.add_argument("source", help="dataset root (ImageNet layout) or a file list")
    ver.add_argument(
        "--split", default=None, help="split sub-folder, e.g. train (default: SOURCE is the split)"
    )
    ver.add_argument("--root", default=None, help="root of the relative paths of a file list")
    ver.add_argument("--out", default="auto", help="exclusion list path (default: beside the split / list)")
    ver.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    bad = verify_dataset(args.source, args.split, args.root, args.out, args.workers)
    print(f"{len(bad)} unreadable image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
