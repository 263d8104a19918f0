"""MAE-style token masking and the tokenizer's forward-flow noise (SPEC section 2).

Every random quantity comes from an explicit `torch.Generator` (or explicit noise),
so tests and reproducible runs can pin them down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rectok import kernels

SCHEDULES = ("shift", "uniform", "lognorm")


def sample_mask_ratio(
    generator: torch.Generator | None = None, low: float = -0.1, high: float = 0.4
) -> float:
    """One masking ratio per step, r = max(0, U(low, high)).

    With the official (-0.1, 0.4) a fifth of the steps see the full image.
    """
    device = generator.device if generator is not None else None
    u = torch.rand((), generator=generator, dtype=torch.float64, device=device).item()
    return max(0.0, low + (high - low) * u)


class MaskIds(NamedTuple):
    """Index tensors of one random masking: kept tokens are ids_shuffle[:, :len_keep]."""

    ids_shuffle: torch.Tensor  # (B, L) int64, a permutation per sample
    ids_restore: torch.Tensor  # (B, L) int64, argsort(ids_shuffle)
    ids_keep: torch.Tensor  # (B, len_keep) int64
    len_keep: int


def random_masking_ids(
    batch: int,
    seq_len: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskIds:
    """Per-sample random permutations keeping ceil(seq_len * (1 - ratio)) tokens."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    # Ranking uniform noise gives a uniformly random permutation per row (as in MAE).
    noise = torch.rand(batch, seq_len, generator=generator, device=device)
    return masking_from_shuffle(torch.argsort(noise, dim=1), ratio)


def masking_from_shuffle(ids_shuffle: torch.Tensor, ratio: float) -> MaskIds:
    """The masking of a given per-sample permutation ids_shuffle (B, L): keeps its first
    ceil(L * (1 - ratio)) tokens."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    len_keep = math.ceil(ids_shuffle.shape[1] * (1.0 - ratio))
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return MaskIds(ids_shuffle, ids_restore, ids_shuffle[:, :len_keep], len_keep)


@dataclass
class FlowDraws:
    """Every random draw of one stage-1 forward, given instead of drawn (release-parity tests,
    exact replays). Shapes: ids_shuffle (B, L) int64; posterior_noise and eps (B, L_keep, C)
    standard normal (eps before the gamma scale); tau (B,) the noise level after the schedule."""

    mask_ratio: float
    ids_shuffle: torch.Tensor
    posterior_noise: torch.Tensor
    tau: torch.Tensor
    eps: torch.Tensor


def timestep_shift(grid_h: int, grid_w: int, channels: int) -> float:
    """Resolution/width-dependent shift s = sqrt(h * w * C / 4096) (2.83 at 16x16, C = 128)."""
    return math.sqrt(grid_h * grid_w * channels / 4096)


def shift_tau(u: torch.Tensor, shift: float) -> torch.Tensor:
    """tau = s u / (1 + (s - 1) u): monotone map of [0, 1] onto itself, s > 1 pushes towards noise."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_tau(
    batch: int,
    shift: float = 1.0,
    schedule: str = "shift",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample noise level tau [B] in [0, 1]; tau = 1 is pure noise."""
    if schedule == "shift":
        return shift_tau(torch.rand(batch, generator=generator, device=device), shift)
    if schedule == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if schedule == "lognorm":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def forward_flow(z: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - tau) z + tau eps for z, eps [B, L, C] and tau [B]."""
    return kernels.flow_interpolate(z, eps, tau)
