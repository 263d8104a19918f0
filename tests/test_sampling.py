"""The Euler sampler: its time grid, its guidance rules, and that its loop never syncs with the host.

Proves:
- time_grid runs monotonically from exactly 0 to exactly 1, is linspace at shift 1 and
  otherwise puts the small steps at the noise end (shifts s and 1/s give the same grid);
- euler_sample integrates exactly (constant field: x1 = x0 + v; every t_n is passed);
- CFG makes one batched forward per step (conditional half, then null-class half) and
  AutoGuidance one forward of each model per step;
- guidance applies exactly at the steps whose t_n lies in `interval`, the conditional
  velocity elsewhere;
- no host synchronisation per step: the whole sampler runs on the meta device (where any
  .item() or Python branch on a tensor value raises) and traces into one graph under
  torch.compile(fullgraph=True).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rectok.models.dit import DiTDH, dit_config
from rectok.sampling.euler import euler_sample, time_grid

NULL = 10


class ToyField(nn.Module):
    """v = a * x + b with b = cond for real labels and b = null for the null class; records every call."""

    num_classes = NULL

    def __init__(self, cond: float = 1.0, null: float = 0.0, a: float = 0.0) -> None:
        super().__init__()
        self.cond, self.null, self.a = cond, null, a
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.calls.append((x, t, y))
        b = torch.where(y == NULL, self.null, self.cond).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return self.a * x + b


@pytest.mark.parametrize("shift", [0.25, 0.7, 1.0, 1.4142135623730951, 3.0])
def test_time_grid_properties(shift):
    grid = time_grid(9, shift)
    assert grid.dtype == torch.float32 and grid.shape == (9,)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    steps = grid.diff()
    assert (steps > 0).all()
    if shift == 1:
        assert torch.equal(grid, torch.linspace(0, 1, 9))
    else:
        assert steps[0] < steps[-1]  # dense near the noise end either way: s and 1/s give the same grid
        assert torch.allclose(grid, time_grid(9, 1 / shift), atol=1e-6)


def test_time_grid_formula():
    u = torch.linspace(0, 1, 7, dtype=torch.float64)
    for s in (0.5, 2.0):
        m = s * u / (1 + (s - 1) * u)
        expected = (1 - m).flip(0) if s > 1 else m
        assert torch.allclose(time_grid(7, s).double(), expected, atol=1e-7)


def test_time_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        time_grid(1, 1.0)
    with pytest.raises(ValueError, match="positive"):
        time_grid(5, 0.0)


def test_euler_is_exact_on_a_constant_field():
    field = ToyField(cond=0.5)
    x0 = torch.randn(2, 3, 4, 4)
    out = euler_sample(field, x0, torch.tensor([1, 2]), num_points=6, shift=2.0)
    assert torch.allclose(out, x0 + 0.5, atol=1e-6)
    assert len(field.calls) == 5
    ts = torch.stack([t for _, t, _ in field.calls])  # (steps, B)
    assert torch.equal(ts, time_grid(6, 2.0)[:-1, None].expand(5, 2))


def test_euler_matches_a_plain_loop():
    field = ToyField(a=-0.7, cond=0.3)
    x0 = torch.randn(2, 3, 2, 2)
    grid = time_grid(8, 1.5).tolist()
    x = x0.clone()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        x = x + (t1 - t0) * (-0.7 * x + 0.3)
    out = euler_sample(field, x0, torch.tensor([0, 1]), num_points=8, shift=1.5)
    assert torch.allclose(out, x, atol=1e-6)


def test_cfg_is_one_batched_forward_per_step():
    field = ToyField()
    x0, y = torch.randn(3, 2, 2, 2), torch.tensor([4, 5, 6])
    euler_sample(field, x0, y, num_points=5, shift=1.0, guidance="cfg", scale=2.0)
    assert len(field.calls) == 4
    for x, t, labels in field.calls:
        assert x.shape[0] == t.shape[0] == 6
        assert torch.equal(x[:3], x[3:]) and torch.equal(t[:3], t[3:])
        assert torch.equal(labels, torch.tensor([4, 5, 6, NULL, NULL, NULL]))


def test_autoguidance_calls_both_models_once_per_step():
    model, weak = ToyField(cond=1.0), ToyField(cond=0.25)
    x0, y = torch.randn(2, 2, 2, 2), torch.tensor([1, 2])
    out = euler_sample(model, x0, y, num_points=5, shift=1.0, guidance="autoguidance", scale=3.0, weak=weak)
    assert len(model.calls) == len(weak.calls) == 4
    assert all(x.shape[0] == 2 for x, _, _ in model.calls + weak.calls)
    assert torch.allclose(out, x0 + (0.25 + 3.0 * (1.0 - 0.25)), atol=1e-6)


@pytest.mark.parametrize("guidance", ["cfg", "autoguidance"])
@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.8), (0.5, 1.0), (0.95, 1.0)])
def test_guidance_only_inside_interval(guidance, interval):
    """cond v = 1, reference v = 0: the guided velocity is w inside the interval, 1 outside."""
    w, n = 2.5, 11
    model = ToyField(cond=1.0, null=0.0)
    weak = ToyField(cond=0.0) if guidance == "autoguidance" else None
    x0 = torch.zeros(2, 1, 2, 2)
    out = euler_sample(
        model,
        x0,
        torch.tensor([3, 7]),
        num_points=n,
        shift=1.0,
        guidance=guidance,
        scale=w,
        weak=weak,
        interval=interval,
    )
    grid = time_grid(n, 1.0)  # float32 comparisons, as in the sampler; both ends are inclusive
    lo, hi = interval
    expected = sum(float(t1 - t0) * (w if lo <= t0 <= hi else 1.0) for t0, t1 in zip(grid[:-1], grid[1:]))
    assert torch.allclose(out, torch.full_like(out, float(expected)), atol=1e-6)


def test_sampler_argument_errors():
    field, x0, y = ToyField(), torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    kw = dict(num_points=3, shift=1.0)
    with pytest.raises(ValueError, match="unknown guidance"):
        euler_sample(field, x0, y, guidance="pag", **kw)
    with pytest.raises(ValueError, match="weak model"):
        euler_sample(field, x0, y, guidance="autoguidance", **kw)
    with pytest.raises(ValueError, match="weak model was given"):
        euler_sample(field, x0, y, guidance="cfg", weak=field, **kw)
    with pytest.raises(ValueError, match="t_min < t_max"):
        euler_sample(field, x0, y, guidance="cfg", interval=(0.5, 0.5), **kw)
    with pytest.raises(ValueError, match="labels"):
        euler_sample(field, x0, y[:1], **kw)
    dit = DiTDH(dit_config("dit-dh-tiny")).train()  # label dropout would replace labels by the null class
    with pytest.raises(ValueError, match="training mode"):
        euler_sample(dit, torch.zeros(2, 128, 8, 8), y, **kw)


@pytest.mark.parametrize("guidance", ["none", "cfg", "autoguidance"])
def test_no_host_sync_on_meta_device(guidance):
    """Meta tensors have no values: any .item(), bool(tensor) or value-dependent branch raises."""
    with torch.device("meta"):
        model = DiTDH(dit_config("dit-dh-tiny")).eval()
        weak = DiTDH(dit_config("dit-dh-tiny", hidden_size=(64, 192), depth=(1, 1), num_heads=(1, 3))).eval()
        noise = torch.randn(2, 128, 8, 8)
        y = torch.zeros(2, dtype=torch.long)
    out = euler_sample(
        model,
        noise,
        y,
        num_points=4,
        shift=1.4,
        guidance=guidance,
        scale=1.3,
        weak=weak if guidance == "autoguidance" else None,
        interval=(0.2, 0.9),
    )
    assert out.is_meta and out.shape == noise.shape


@pytest.mark.parametrize("guidance", ["none", "cfg", "autoguidance"])
def test_sampler_traces_into_one_graph(guidance):
    torch._dynamo.reset()
    model, weak = ToyField(a=0.3, cond=1.0, null=-1.0), ToyField(a=0.1, cond=0.5)
    x0, y = torch.randn(2, 3, 2, 2), torch.tensor([1, NULL])
    kw = dict(num_points=5, shift=1.4, guidance=guidance, scale=1.5, interval=(0.2, 0.7))
    kw["weak"] = weak if guidance == "autoguidance" else None
    compiled = torch.compile(euler_sample, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(model, x0, y, **kw), euler_sample(model, x0, y, **kw), atol=1e-6)
