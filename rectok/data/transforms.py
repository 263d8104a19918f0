"""Image transforms: ADM's `center_crop_arr`, RandomResizedCrop, and PIL -> float32 CHW in [-1, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CROPS = ("center", "random_resized")


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
