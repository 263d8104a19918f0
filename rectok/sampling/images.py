"""Images as people look at them: float images in [0, 1] as uint8, and PNG grids. One home for
training's reconstruction and sample grids, sample.py's grids and the evaluation's reconstruction
grid and Inception inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """Images in [0, 1], [B, 3, H, W] float -> [B, H, W, 3] uint8 on the same device.

    "floor" is (x * 255).to(uint8) as the official release writes its PNGs (its rFID used
    that); "round" is round-to-nearest as ADM / DiT sampling scripts do (clamp(127.5 x + 128)).
    """
    if rounding not in ("floor", "round"):
        raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    x = images.clamp(0.0, 1.0) * 255.0
    x = x.floor() if rounding == "floor" else x.round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(images: np.ndarray, path: Path, ncol: int = 8) -> Path:
    """uint8 [N, H, W, 3] -> one PNG with `ncol` images per row (2 px white gaps)."""
    n, h, w, _ = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    pad = 2
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = images[k]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def save_image_rows(rows: list[torch.Tensor], path: Path) -> Path:
    """One PNG with a row per tensor; every row [n, 3, H, W] in [0, 1], rounded to the nearest uint8."""
    images = to_uint8(torch.cat([row.float() for row in rows]), rounding="round")  # (rows * n, H, W, 3)
    return save_grid(images.cpu().numpy(), path, ncol=len(rows[0]))
