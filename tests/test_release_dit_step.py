"""Two DiT^DH training steps of ours match the official release's, draw for draw.

The fixture tests/fixtures/release/dit_step.safetensors (made by make_dit_step.py there, from the
release's own train_one_epoch_generator at commit ee87aaf, CPU, float32) holds two batches, every
random draw of the two steps (noise, time u, label-dropout mask), the loss and the grad norm before
clipping of each step, and the parameters and EMA after the second step, in the official layout.

Starting from the same official weights (../shared/fixtures/official), our pieces of the DiT^DH
training loop (rectok/training/dit_stage.py: flow_matching_loss with the release's draws injected,
build_adamw's parameter groups, set_lr, unscale_and_clip / step_or_skip, EMA.update) reproduce:
- our time t = 1 - s u / (1 + (s - 1) u) from the release's uniform draw u, and the labels after
  dropout (the release's t = 1 is data too, so the draws carry over unmapped);
- the no-weight-decay group, tensor by tensor (under weight decay 0.02, so that it matters);
- loss and grad norm of both steps to 1e-5 relative (step 1 is clipped, step 2 is not);
- the recipe of our DiT^DH presets (lr schedule, betas, weight decay, clipping, EMA rate, label
  dropout) is the one run_train_diffusion.sh gives the release;
- parameters and EMA after both steps to 1e-4 relative per tensor, and their *change* from the
  start to 1e-4 of the largest change, so that a wrong update (lr, betas, weight decay, clipping,
  EMA rate) cannot hide under the size of the weights. Two allowances are added per element, both
  float32 facts rather than formula slack: 2 ulps of the value per step (the release's EMA rounds
  mul_ + add_, ours lerp), and Adam's amplification of gradient rounding, 2 lr delta / (sqrt(v) + eps)
  per step (times 1 - decay for the EMA) with delta = 5e-6 of the tensor's largest gradient (the
  two backward passes agree to ~1e-6 of it). The second matters where an element's gradient is
  small; the test prints how far the two widen the change tolerance (median per tensor).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from release_fixtures import fixture_path, relative_error
from safetensors import safe_open
from safetensors.torch import load_file

from rectok.checkpoints.official_dit import dit_from_official, dit_to_official
from rectok.models import flow
from rectok.training.config import train_config
from rectok.training.dit_stage import DiTDraws, flow_matching_loss
from rectok.training.ema import EMA
from rectok.training.optim import build_adamw, set_lr
from rectok.training.progress import Schedule
from rectok.training.runtime import read_flags, step_or_skip, unscale_and_clip

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4
# Gradient rounding between the two implementations, relative to the tensor's largest gradient
# (measured: up to 9e-7 per element at step 1, mostly a floor rather than relative to the element).
GRAD_RTOL = 5e-6
ULPS_PER_STEP = 2


@functools.cache
def _fixture() -> tuple[dict[str, torch.Tensor], dict]:
    path = fixture_path("dit_step.safetensors")
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
    return load_file(str(path)), info


@functools.cache
def _replay(official_state: str) -> dict:
    """Our two steps from the official weights with the release's draws; what the tests compare."""
    ref, info = _fixture()
    dit = dit_from_official(load_file(official_state)).train()
    dit.label_dropout = info["label_drop_prob"]
    grid, channels = dit.config.grid_size, dit.config.in_channels
    shift = flow.timestep_shift(grid, grid, channels)  # what train_dit uses when --dit.time_shift is unset
    start = {k: v.clone() for k, v in dit_to_official(dit).items()}

    opt = build_adamw(dit, info["lr"], info["weight_decay"], (info["beta1"], info["beta2"]))
    ema = EMA(dit, info["ema_rate"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float32: train_dit disables it too
    # Official names of our parameters: dit_to_official's tensors share storage with them.
    official_name = {v.data_ptr(): k for k, v in dit_to_official(dit).items()}
    no_decay = sorted(official_name[p.data_ptr()] for p in opt.param_groups[0]["params"])
    out = {"shift": shift, "start": start, "no_decay": no_decay}
    adam_bound = {}  # per element: sum over steps of lr * delta / (sqrt(v_hat) + eps)
    for i in range(1, info["steps"] + 1):
        draws = DiTDraws(ref[f"step{i}.noise"], ref[f"step{i}.u"], ref[f"step{i}.label_drop"])
        set_lr(opt, ref[f"step{i}.lr"].item())
        loss = flow_matching_loss(dit, ref[f"step{i}.x"], ref[f"step{i}.y"], shift, draws=draws)
        scaler.scale(loss).backward()
        gnorm, norm_flag = unscale_and_clip(opt, scaler, list(dit.parameters()), info["grad_clip"])
        assert read_flags(norm_flag) == [False]
        step_or_skip(opt, scaler, skip=False)
        ema.update(dit)
        out[f"step{i}.loss"], out[f"step{i}.grad_norm"] = loss.detach(), gnorm
        out[f"step{i}.t"] = 1.0 - flow.shift_tau(draws.u, shift)
        out[f"step{i}.y_used"] = dit.drop_labels(ref[f"step{i}.y"], draws.label_drop)
        for group in opt.param_groups:
            for p in group["params"]:
                v_hat = opt.state[p]["exp_avg_sq"] / (1 - group["betas"][1] ** i)
                den = v_hat.sqrt() + group["eps"]
                key = official_name[p.data_ptr()]
                # Elements that never had a gradient (unused label rows) are exactly 0 on both sides.
                bound = torch.where(v_hat > 0, group["lr"] * GRAD_RTOL * den.max() / den, 0.0)
                adam_bound[key] = adam_bound.get(key, 0) + bound.reshape(start[key].shape)
    out["params"] = dit_to_official(dit)
    ema_dit = dit_from_official(load_file(official_state))
    ema.copy_to(ema_dit)
    out["ema"] = dit_to_official(ema_dit)
    out["adam_bound"] = adam_bound
    return out


@pytest.fixture
def replay(official_fixtures) -> dict:
    return _replay(str(official_fixtures / "dit_dh_tiny_official_state.safetensors"))


def test_time_shift_and_draws_carry_over(replay):
    ref, info = _fixture()
    assert replay["shift"] == pytest.approx(info["time_shift"], rel=1e-12)
    for i in range(1, info["steps"] + 1):
        err = (replay[f"step{i}.t"] - ref[f"step{i}.t"]).abs().max().item()
        print(f"step {i}: max |t_ours - t_release| = {err:.2e}")
        assert err <= 1e-7
        assert torch.equal(replay[f"step{i}.y_used"], ref[f"step{i}.y_used"])
    drops = torch.stack([ref[f"step{i}.label_drop"] for i in range(1, info["steps"] + 1)])
    assert drops.any() and not drops.all(), "the fixture should drop some labels and keep others"


def test_no_weight_decay_group_matches(replay):
    _, info = _fixture()
    assert info["weight_decay"] > 0, "with weight decay 0 the fixture could not see the groups"
    ours, release = set(replay["no_decay"]), set(info["no_decay"])
    assert ours == release, (
        f"only ours: {sorted(ours - release)}; only the release's: {sorted(release - ours)}"
    )


@pytest.mark.parametrize("what", ["loss", "grad_norm"])
def test_loss_and_grad_norm(replay, what):
    ref, info = _fixture()
    for i in range(1, info["steps"] + 1):
        err = relative_error(replay[f"step{i}.{what}"], ref[f"step{i}.{what}"])
        print(
            f"step {i} {what}: ours {replay[f'step{i}.{what}'].item():.7f}, "
            f"release {ref[f'step{i}.{what}'].item():.7f}, relative error {err:.2e}"
        )
        assert err <= LOSS_RTOL
    # Clipping is exercised: step 1 lies above the threshold, step 2 below.
    assert ref["step1.grad_norm"] > info["grad_clip"] > ref["step2.grad_norm"]


def test_default_recipe_is_the_release_recipe():
    """Our DiT^DH presets train with what run_train_diffusion.sh passes to main_diffusion.py (read by
    the release's own parser when the fixture was made), and our lr schedule is its
    adjust_learning_rate (constant to epoch 40, linear to min_lr at 800, min_lr after)."""
    _, info = _fixture()
    rel = info["release_recipe"]
    assert rel["ditdh_sched"] and rel["lr_sched"] == "linear"
    for preset in ("dit-dh-xl", "dit-dh-s"):
        cfg = train_config("dit", preset, dit__tokenizer_ckpt="tok.pt")  # required, not read here
        o = cfg.optim
        ours = {
            "lr": cfg.base_lr(),
            "min_lr": o.min_lr,
            "warmup_start_epoch": o.hold_epochs,
            "warmup_end_epoch": o.decay_end_epochs,
            "weight_decay": o.weight_decay,
            "grad_clip": o.grad_clip,
            "ema_rate": o.ema_decay,
            "beta1": o.beta1,
            "beta2": o.beta2,
            "label_dropout_prob": cfg.dit.label_dropout,
        }
        assert ours == {k: rel[k] for k in ours}, preset
        assert o.schedule == "const_linear" and o.warmup_epochs == 0
        steps_per_epoch = 1000
        sched = Schedule(cfg, batches_per_epoch=steps_per_epoch, accum=1)
        for epoch, lr in info["release_lr_by_epoch"]:
            assert sched.lr(round(epoch * steps_per_epoch)) == pytest.approx(lr, rel=1e-12), (preset, epoch)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


@pytest.mark.parametrize("which", ["param", "ema"])
def test_state_after_two_steps(replay, which):
    ref, info = _fixture()
    ours = replay["params" if which == "param" else "ema"]
    keys = sorted(k.split(".", 1)[1] for k in ref if k.startswith(f"{which}."))
    assert keys and set(keys) <= set(ours)
    # The EMA sees a parameter's update error scaled by 1 - decay.
    adam_scale = 2.0 if which == "param" else 2.0 * (1 - info["ema_rate"])
    worst = {"value": (0.0, ""), "change": (0.0, "")}
    plain = {"value": (0.0, ""), "change": (0.0, "")}
    widening = []  # per tensor: median of (change tolerance) / (1e-4 of the largest change)
    for key in keys:
        want, got, start = ref[f"{which}.{key}"].double(), ours[key].double(), replay["start"][key].double()
        err, change = (got - want).abs(), want - start
        floats = ULPS_PER_STEP * info["steps"] * _ulp(ref[f"{which}.{key}"]).double()
        adam = adam_scale * replay["adam_bound"][key].double()
        base = {"value": PARAM_RTOL * want.abs().max(), "change": PARAM_RTOL * change.abs().max()}
        for kind in worst:
            worst[kind] = max(worst[kind], ((err / (base[kind] + floats + adam)).max().item(), key))
        plain["value"] = max(plain["value"], (relative_error(got, want), key))
        plain["change"] = max(plain["change"], (relative_error(got - start, change), key))
        widening.append(((base["change"] + floats + adam) / base["change"]).median().item())
    for kind in worst:
        print(
            f"{which} {kind}: max relative error {plain[kind][0]:.2e} ({plain[kind][1]}); "
            f"worst error / tolerance {worst[kind][0]:.2f} ({worst[kind][1]})"
        )
    print(
        f"{which}: change tolerance / (1e-4 of the largest change), median per tensor: "
        f"{min(widening):.2f} .. {max(widening):.2f}"
    )
    assert worst["value"][0] <= 1.0 and worst["change"][0] <= 1.0, worst
