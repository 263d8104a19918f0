"""Optimizer utilities and EMA (rectok/training/optim.py, rectok/training/ema.py).

Proves: weight decay reaches exactly the matrices of the tokenizer (not biases, norms,
embeddings, mask tokens, frozen parameters) and AdamW really applies it that way; the
warm-up + cosine, constant and DiT constant-then-linear schedules hit their anchor
points; clipping returns the norm before clipping and clips to max_norm; the EMA follows
its closed form in float32, copies frozen parameters and buffers, and round-trips.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.training.ema import EMA
from rectok.training.optim import (
    LRSchedule,
    build_adamw,
    clip_grad_norm,
    param_groups,
    set_lr,
    use_fused,
)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_on_the_tokenizer():
    tok = RecTok(tokenizer_config("rectok-tiny"))
    tok.semantic_decoder.requires_grad_(False)
    groups = param_groups(tok, weight_decay=1e-4)
    no_decay, decay = (_names(tok, g) for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-4]
    for name in (
        "encoder.pos_embed",
        "pixel_decoder.mask_token",
        "pixel_decoder.pos_embed",
        "encoder.norm_pre.weight",
    ):
        assert name in no_decay, name
    assert all(n.endswith("bias") is False for n in decay)
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "pixel_decoder.to_pixels.weight" in decay
    assert not any(n.startswith("semantic_decoder") for n in no_decay | decay)  # frozen: not optimised
    trainable = {n for n, p in tok.named_parameters() if p.requires_grad}
    assert no_decay | decay == trainable and not (no_decay & decay)


def test_adamw_decays_only_the_decay_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_adamw(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient signal: only decoupled weight decay moves weights
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"].detach(), before["0.weight"] * (1 - 0.1 * 0.5))
    for n in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[n].detach(), before[n]), n


def test_build_adamw_without_trainable_parameters_fails():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw(model, lr=1e-3, weight_decay=0.0)


def test_warmup_cosine_schedule_anchor_points():
    s = LRSchedule("cosine", base_lr=4e-4, total_steps=200, warmup_steps=50, min_lr=1e-5)
    assert s(0) == 0.0
    assert s(25) == pytest.approx(2e-4)
    assert s(50) == pytest.approx(4e-4)
    assert s(125) == pytest.approx(1e-5 + (4e-4 - 1e-5) * 0.5)  # half-way through the cosine
    assert s(200) == pytest.approx(1e-5) and s(10_000) == pytest.approx(1e-5)
    values = [s(i) for i in range(50, 201)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_dit_constant_then_linear_schedule():
    # DiT^DH recipe in "epochs" of one step each: 2e-4 until 40, linear to 2e-5 at 800.
    s = LRSchedule("const_linear", base_lr=2e-4, total_steps=800, hold_steps=40, min_lr=2e-5)
    assert s(0) == s(40) == 2e-4
    assert s(420) == pytest.approx((2e-4 + 2e-5) / 2)
    assert s(800) == pytest.approx(2e-5) and s(900) == pytest.approx(2e-5)


def test_constant_schedule_and_errors():
    s = LRSchedule("constant", base_lr=1e-3, total_steps=10, warmup_steps=4)
    assert [s(i) for i in (0, 2, 4, 9)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule("step", base_lr=1e-3, total_steps=10)
    with pytest.raises(ValueError, match=">= 0"):
        LRSchedule("cosine", base_lr=-1e-3, total_steps=10)


def test_set_lr_respects_lr_scale():
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [nn.Parameter(torch.zeros(2))], "lr_scale": 0.1}])
    set_lr(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])


def test_clip_grad_norm_returns_norm_before_clipping():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.full((2, 2), 2.0)  # |g|^2 = 9 + 16 = 25
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    after = math.sqrt(a.grad.square().sum() + b.grad.square().sum())
    assert after == pytest.approx(1.0, rel=1e-5)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0)
    assert clip_grad_norm([a, b], max_norm=0.0).item() == pytest.approx(5.0)  # 0: measure only
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0, 0.0]))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 1).requires_grad_(False)
        self.bn = nn.BatchNorm1d(3)


def test_ema_closed_form_frozen_copy_and_buffers():
    torch.manual_seed(0)
    net = _Net()
    e0 = net.lin.weight.detach().clone()
    ema = EMA(net, decay=0.9)
    target = torch.randn(3, 3)
    with torch.no_grad():
        net.lin.weight.copy_(target)
        net.frozen.weight.fill_(7.0)
        net.bn.running_mean.fill_(3.0)
    for _ in range(5):
        ema.update(net)
    expected = 0.9**5 * e0 + (1 - 0.9**5) * target
    torch.testing.assert_close(ema.params["lin.weight"], expected)
    assert torch.equal(ema.params["frozen.weight"], torch.full((1, 3), 7.0))
    assert torch.equal(ema.buffers["bn.running_mean"], torch.full((3,), 3.0))
    assert ema.num_updates == 5
    other = _Net()
    ema.copy_to(other)
    torch.testing.assert_close(other.lin.weight.detach(), expected)


def test_ema_is_float32_for_bf16_models():
    torch.manual_seed(0)
    net = nn.Linear(4, 4).bfloat16()
    ema = EMA(net, decay=0.9995)
    assert all(t.dtype == torch.float32 for t in ema.params.values())
    e0 = ema.params["weight"].clone()
    with torch.no_grad():
        net.weight.add_(0.01)
    ema.update(net)
    step = ema.params["weight"] - e0
    torch.testing.assert_close(step, 5e-4 * (net.weight.float() - e0))
    # an update this small vanishes when the average is rounded to bf16: why the EMA is float32
    assert torch.equal(ema.params["weight"].bfloat16(), e0.bfloat16())
    assert step.abs().min() > 0


def test_ema_state_dict_roundtrip_and_mismatch():
    torch.manual_seed(0)
    net = _Net()
    ema = EMA(net, decay=0.99)
    with torch.no_grad():
        net.lin.weight.mul_(2)
    ema.update(net)
    fresh = EMA(_Net(), decay=0.5)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.decay == 0.99 and fresh.num_updates == 1
    for k in ema.params:
        assert torch.equal(fresh.params[k], ema.params[k])
    with pytest.raises(KeyError, match="does not match"):
        EMA(nn.Linear(3, 3), decay=0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)


def test_use_fused_picks_the_fused_adamw_where_torch_has_one():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert use_fused("auto", cuda) is True and use_fused("auto", cpu) is True
    assert use_fused("auto", mps) is None
    assert use_fused("on", mps) is True and use_fused("off", cuda) is None and use_fused("off", cpu) is None
    with pytest.raises(ValueError, match="unknown optim.fused 'yes'; choose one of auto, on, off"):
        use_fused("yes", cpu)
    # the fused CPU AdamW agrees with torch's default (the release's) to rounding
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    fused = build_adamw(model, 1e-2, 0.1, fused=use_fused("on", cpu))
    plain = build_adamw(twin, 1e-2, 0.1, fused=use_fused("off", cpu))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((model, fused), (twin, plain)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_read_of_the_flags_skips_exactly_the_nonfinite_updates():
    from rectok.training.runtime import nonfinite_flag, read_flags, step_or_skip, unscale_and_clip

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model = nn.Linear(4, 2)
    opt = build_adamw(model, 1e-2, 0.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 4)).sum()
    loss.backward()
    model.bias.grad[0] = float("inf")  # a finite loss, a non-finite grad norm
    norm, norm_flag = unscale_and_clip(opt, scaler, list(model.parameters()), 1.0)
    assert not math.isfinite(norm.item())
    assert read_flags(nonfinite_flag(loss.detach()), norm_flag) == [False, True]
    step_or_skip(opt, scaler, skip=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not opt.state  # cleared, no AdamW step
    assert read_flags(nonfinite_flag(torch.tensor([1.0, float("nan")]))) == [True]
