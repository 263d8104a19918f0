"""Per-image PSNR and SSIM for images in [0, 1], and the float -> uint8 quantisation used before FID.

PSNR is computed in float before quantisation (SPEC section 8), per image, and averaged
by the caller, as the official release does. SSIM is Wang et al. 2004 as peers report
it: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
population (not sample) covariances, computed per channel on the "valid" region (no
padding) and averaged over channels and pixels. That is exactly
skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=...), which crops the filter
border, checked in tests/test_eval_metrics.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"{name}: expected two [B, C, H, W] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image: x, y [B, C, H, W] -> [B] float64 (inf where the images are identical)."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian taps [11] in float64, as scipy.ndimage.gaussian_filter builds them."""
    r = SSIM_WINDOW // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _blur_valid(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of every channel, "valid" region only: [N, C, H, W] -> [N, C, H-10, W-10]."""
    c = x.shape[1]
    x = F.conv2d(x, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image: x, y [B, C, H, W] (H, W >= 11) -> [B] float64."""
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}"
        )
    x, y = x.double(), y.double()
    w = _gaussian_window(x.device)
    # One filtering pass over the five moment maps stacked along the batch.
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.cat([x, y, x * x, y * y, x * y]), w).chunk(5)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
