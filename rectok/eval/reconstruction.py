"""Tokenizer reconstruction quality over a dataset: PSNR, SSIM and rFID (SPEC section 8).

Reconstructions go through the posterior mean: moments = tok.encoder(x) [B, L, 2C] (first C
channels are the mean), images = clamp(tok.pixel_decoder(mean) * 0.5 + 0.5, 0, 1). PSNR and
SSIM are per image in float before quantisation, then averaged. rFID compares Inception
features of the quantised reconstructions with those of the quantised inputs, or with given
reference statistics (e.g. the 50k ImageNet validation images, center-cropped: rFID-val50k).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from rectok.sampling.images import save_image_rows, to_uint8

from .fid import FIDStats, fid_from_stats, write_json
from .image_io import first_images
from .image_metrics import psnr, ssim
from .inception import INCEPTION_PORT, POOL_FEATURES, extract_features


@torch.no_grad()
def evaluate_reconstruction(
    tok: torch.nn.Module,
    loader: Iterable,
    *,
    inception: torch.nn.Module | None = None,
    inception_info: dict | None = None,
    reference: FIDStats | None = None,
    name: str = "rFID",
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    rounding: str = "floor",
    autocast: torch.dtype | None = None,
    num_grid: int = 8,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """PSNR / SSIM (and rFID when `inception` is given) of `tok` over `loader`'s (images in [-1, 1], labels).

    `reference`: FID statistics to compare reconstructions against; None uses the loader's own
    images. `rounding`: float -> uint8 of the reconstructions before Inception ("floor" as the
    release writes its PNGs, or "round"); input images are always rounded (exact for uint8 data).
    `autocast`: run the tokenizer under torch.autocast with this dtype (the release used bf16);
    metrics are always computed in float.
    With `out_dir`, writes reconstruction.json (with `meta`, e.g. the checkpoint) and
    reconstruction_grid.png there.
    """
    tok.eval()
    psnr_sum = ssim_sum = 0.0
    count = 0
    rec_feats, ref_feats = [], []
    grid_orig, grid_rec = [], []
    for start, images, _labels in first_images(loader, max_images, "reconstruct", progress):
        x = images.to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            rec = tok.reconstruct(x)
        orig = torch.clamp(x.float() * 0.5 + 0.5, 0.0, 1.0)
        psnr_sum += psnr(orig, rec).sum().item()
        ssim_sum += ssim(orig, rec).sum().item()
        if inception is not None:
            rec_feats.append(
                extract_features(inception, [to_uint8(rec, rounding)], progress=False)[POOL_FEATURES]
            )
            if reference is None:
                # Inputs always round: that recovers the loader's uint8 pixels exactly, where floor
                # would shift a quarter of the levels down by one through float error.
                ref_feats.append(
                    extract_features(inception, [to_uint8(orig, "round")], progress=False)[POOL_FEATURES]
                )
        if sum(len(g) for g in grid_orig) < num_grid:
            grid_orig.append(orig.cpu())
            grid_rec.append(rec.cpu())
        count = start + len(x)
    result: dict = {
        "metrics": {"PSNR": psnr_sum / count, "SSIM": ssim_sum / count},
        "num_images": count,
        "reconstruction": "posterior mean, clamped to [0, 1]; PSNR/SSIM in float per image, then averaged",
        "ssim": "Wang et al. 2004: 11x11 Gaussian, sigma 1.5, data range 1, per channel",
    }
    if inception is not None:
        rec_stats = FIDStats.from_features(np.concatenate(rec_feats))
        ref_stats = reference if reference is not None else FIDStats.from_features(np.concatenate(ref_feats))
        result["metrics"][name] = fid_from_stats(rec_stats, ref_stats)
        result["rfid_reference"] = (
            "given statistics" if reference is not None else "the evaluated input images"
        )
        result["uint8_rounding"] = rounding
        result["inception"] = {
            **(inception_info or {}),
            "port": INCEPTION_PORT,
            "fid_features": "pool3 (2048)",
        }
    if meta:
        result["meta"] = meta
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(result, out_dir / "reconstruction.json")
        originals, recons = torch.cat(grid_orig)[:num_grid], torch.cat(grid_rec)[:num_grid]
        save_image_rows([originals, recons], out_dir / "reconstruction_grid.png")  # originals on top
    return result
