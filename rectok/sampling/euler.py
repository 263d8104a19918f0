"""Euler sampling of a DiT^DH velocity field from noise (t = 0) to data (t = 1), SPEC section 7.

Guidance, with v the conditional velocity of `dit`:
- "none":          v
- "cfg":           v_null + w (v - v_null), v_null from the null class; both halves run
                   in one batched forward per step.
- "autoguidance":  v_weak + w (v - v_weak), v_weak from a weaker model of the same family.
Guidance applies at the steps whose start time t_n lies in `interval` (both ends
included, as in the release); elsewhere the plain conditional v is used.

The loop never reads a tensor value on the host: the time grid, step sizes and the
per-step guidance switch are tensors prepared before the loop, so a step can be
compiled or captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GUIDANCE = ("none", "cfg", "autoguidance")

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(num_points: int, shift: float, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The shifted Euler time grid [num_points], float32, increasing from 0 (noise) to 1 (data).

    u = linspace(0, 1, N), m = s u / (1 + (s - 1) u); for s > 1 the grid is flip(1 - m), for
    0 < s <= 1 it is m (s = 1: plain linspace). Both branches put the small steps at the noise
    end, and s and 1/s give the same grid up to rounding (flip(1 - m(s)) = m(1/s)).
    """
    if num_points < 2:
        raise ValueError(f"the time grid needs at least 2 points (1 Euler step), got {num_points}")
    if not shift > 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    u = torch.linspace(0, 1, num_points, dtype=torch.float32, device=device)
    m = shift * u / (1 + (shift - 1) * u)
    return torch.flip(1 - m, dims=[0]) if shift > 1 else m


def guided_velocity(
    dit: Velocity,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    guidance: str,
    scale: float,
    active: torch.Tensor,
    weak: Velocity | None = None,
    null_class: int | None = None,
) -> torch.Tensor:
    """One guided velocity evaluation; x [B, ...], t [B], y [B]; `active` is a 0-d bool tensor that
    switches guidance on for this step (no host read)."""
    if guidance == "none":
        return dit(x, t, y)
    if guidance == "cfg":
        y_null = torch.full_like(y, null_class)
        v_cond, v_null = dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).chunk(2)
        return torch.where(active, v_null + scale * (v_cond - v_null), v_cond)
    if guidance == "autoguidance":
        v, v_weak = dit(x, t, y), weak(x, t, y)
        return torch.where(active, v_weak + scale * (v - v_weak), v)
    raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE)}")


@torch.no_grad()
def euler_sample(
    dit: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    num_points: int,
    shift: float,
    guidance: str = "none",
    scale: float = 1.0,
    weak: nn.Module | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
    progress: bool = False,
) -> torch.Tensor:
    """Euler on `time_grid(num_points, shift)`: x <- x + (t_{n+1} - t_n) v(x, t_n), from t = 0 to 1.

    noise [B, C, h, w] is x at t = 0, y [B] int64 the class labels; returns x at t = 1.
    `scale` is the guidance weight w, `weak` the AutoGuidance model, `interval` = (t_min, t_max)
    the times at which guidance is on. Models must be in eval mode (no label dropout).
    """
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE)}")
    if guidance == "autoguidance" and weak is None:
        raise ValueError("guidance='autoguidance' needs the weak model: pass weak=<DiTDH>")
    if guidance != "autoguidance" and weak is not None:
        raise ValueError(f"a weak model was given but guidance is {guidance!r}; use guidance='autoguidance'")
    lo, hi = interval
    if not lo < hi:
        raise ValueError(f"guidance interval must be (t_min, t_max) with t_min < t_max, got {interval}")
    if y.shape != noise.shape[:1]:
        raise ValueError(f"labels {tuple(y.shape)} do not match the batch of noise {tuple(noise.shape)}")
    for name, net in (("dit", dit), ("weak", weak)):
        if net is not None and net.training and getattr(net, "label_dropout", 0) > 0:
            raise ValueError(f"{name} is in training mode (label dropout on): call .eval() before sampling")
    null_class = getattr(dit, "num_classes", None)
    if guidance == "cfg" and null_class is None:
        raise ValueError("guidance='cfg' needs dit.num_classes (the null-class label)")

    grid = time_grid(num_points, shift, device=noise.device)
    t_start, dt = grid[:-1], grid[1:] - grid[:-1]  # (steps,)
    active = (t_start >= lo) & (t_start <= hi)  # per-step guidance switch, decided before the loop
    steps = range(num_points - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"Euler ({guidance})")

    x = noise
    batch = noise.shape[0]
    for n in steps:
        t = t_start[n].expand(batch)
        v = guided_velocity(
            dit, x, t, y, guidance=guidance, scale=scale, active=active[n], weak=weak, null_class=null_class
        )
        x = x + dt[n] * v
    return x
