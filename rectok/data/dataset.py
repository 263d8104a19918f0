"""The map-style dataset: decode, crop, flip (a per-(seed, epoch, index) RNG), and what to do with
unreadable files (substitute the next readable one in training, drop it in evaluation)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rectok.data.sources import SampleSet
from rectok.data.transforms import CROPS, center_crop_arr, load_rgb, random_resized_crop, to_tensor

log = logging.getLogger(__name__)


# The retry budget of training substitution: a run whose data is mostly unreadable should
# stop with an error instead of looping.
MAX_CONSECUTIVE_BAD = 64


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
