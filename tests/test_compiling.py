"""torch.compile at the measured scope (rectok/training/compiling.py, train.py --compile_scope).

Proves: `auto` resolves to per-block compile under FSDP and whole modules otherwise, and a bad scope
is refused with the choices; over the mask lengths of the schedule the tokenizer's networks
compile at most three times each (static graphs, then one with a symbolic length); a compiled DiT^DH
draws its label dropout in eager PyTorch, so a compiled training forward equals the eager one;
flow_matching_loss draws that dropout in the release's order (the model's own numbers);
train.py --compile trains the tokenizer to the eager losses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_script
from torch._dynamo.testing import CompileCounter

from rectok import kernels
from rectok.models import flow
from rectok.models.dit import DiTDH, dit_config
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.training.compiling import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    compile_model,
    compile_units,
    resolve_scope,
)
from rectok.training.config import train_config
from rectok.training.dit_stage import flow_matching_loss, model_label_dropout

train = load_script("train.py")


def test_auto_scope_is_blocks_under_fsdp_only_and_bad_choices_are_refused():
    assert resolve_scope("auto", fsdp=True) == "blocks"
    assert resolve_scope("auto", fsdp=False) == "modules"
    assert resolve_scope("modules", fsdp=True) == "modules"  # an explicit choice is kept
    with pytest.raises(ValueError, match="auto, modules, blocks"):
        resolve_scope("whole", fsdp=False)
    cfg = train_config("tokenizer", "tiny")
    cfg.compile_scope, cfg.compile_mode = "whole", "fast"
    with pytest.raises(ValueError, match="compile_scope must be one of " + ", ".join(COMPILE_SCOPES)) as err:
        cfg.validate()
    assert "compile_mode must be one of " + ", ".join(COMPILE_MODES) in str(err.value)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_model(torch.nn.Linear(2, 2), "modules", mode="fast")


def test_modules_scope_compiles_the_tokenizer_networks_whole():
    tok = RecTok(tokenizer_config("rectok-tiny"))
    assert compile_units(tok) == [tok.encoder, tok.pixel_decoder, tok.semantic_decoder]
    dit = DiTDH(dit_config("dit-dh-tiny", in_channels=16, grid_size=4))
    assert compile_units(dit) == [dit]


def test_mask_lengths_compile_each_network_at_most_three_times():
    torch._dynamo.reset()
    torch.manual_seed(0)
    tok = RecTok(tokenizer_config("rectok-tiny")).train()  # 16 tokens: ratios 0-0.4 keep 10-16
    counter = CompileCounter()
    compile_model(tok, "modules", backend=counter)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    kept = []
    with kernels.use_backend("torch"), torch.no_grad():
        for ratio in (0.0, 0.1, 0.2, 0.3, 0.4, 0.35):
            tok.cfg = dataclasses.replace(tok.cfg, mask_ratio_min=ratio, mask_ratio_max=ratio)
            kept.append(tok(x, generator=torch.Generator().manual_seed(1)).mask.len_keep)
            if len(kept) == 3:
                after_three = counter.frame_count
    assert kept == [16, 15, 13, 12, 10, 11]
    # encoder: 16 static, then symbolic; decoders: 16 static, 15 static (the one mask token is a
    # size-1 block, which Dynamo specialises), then symbolic
    assert after_three == 8
    assert counter.frame_count == after_three, "a later mask length compiled again"


def _small_dit(label_dropout: float = 0.5) -> DiTDH:
    """A tiny DiT^DH in training mode, weights perturbed (the release's init zeroes the output layer)."""
    torch.manual_seed(0)
    cfg = dit_config(
        "dit-dh-tiny", in_channels=16, grid_size=4, hidden_size=(64, 64), depth=(1, 1), num_heads=(2, 2)
    )
    model = DiTDH(cfg).train()
    model.label_dropout = label_dropout
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_compiled_dit_draws_the_eager_label_dropout():
    """Inductor draws its own random numbers inside a graph: the label dropout must stay outside."""
    torch._dynamo.reset()
    model = _small_dit()
    compiled = DiTDH(model.config).train()
    compiled.load_state_dict(model.state_dict())
    compiled.label_dropout = 0.5
    compile_model(compiled, "modules")
    x, t, y = torch.randn(16, 16, 4, 4), torch.rand(16), torch.arange(16) % 10
    with kernels.use_backend("torch"), torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            ref = model(x, t, y)
            torch.manual_seed(seed)
            torch.testing.assert_close(compiled(x, t, y), ref, atol=1e-5, rtol=1e-5)


def test_compiled_tokenizer_training_matches_eager(demo_16, tmp_path):
    """The whole train.py path (teacher, losses, masking at the schedule's random ratios, AdamW);
    the blocks scope is checked against eager in test_activation_checkpointing."""

    def run(name: str, *extra: str) -> list:
        torch._dynamo.reset()
        return train.main([
            "--data.path", str(demo_16), "--run_dir", str(tmp_path / name), "--global_batch", "4",
            "--micro_batch", "4", "--max_steps", "2", "--log_every", "1", "--image_every", "0",
            "--ckpt_every", "0", "--tensorboard", "false", "--data.eval_images", "2",
            "--data.num_workers", "0", "--export", "false", *extra,
        ])["history"]  # fmt: skip

    eager = run("eager")
    compiled = run("compiled", "--compile", "true", "--compile_scope", "modules")
    assert len(eager) == len(compiled) == 2
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_flow_matching_loss_draws_what_the_model_would():
    """The label dropout is drawn in flow_matching_loss (so a compiled DiT^DH has no draw inside),
    in the release's order: the same loss as the model drawing it in its forward."""
    model = _small_dit()
    x1, y = torch.randn(16, 16, 4, 4), torch.arange(16) % 10
    torch.manual_seed(3)
    loss = flow_matching_loss(model, x1, y, 1.0)
    torch.manual_seed(3)
    eps, u = torch.randn(x1.shape), torch.rand(16)
    t = 1.0 - flow.shift_tau(u, 1.0)
    v = model(t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * eps, t, y)  # draws in its forward
    assert torch.equal(loss, kernels.velocity_mse(v, x1, eps))
    torch.manual_seed(4)
    drawn = model_label_dropout(model, y)  # drawn outside the model, so the model draws nothing
    torch.manual_seed(4)
    assert drawn is not None and torch.equal(drawn, torch.rand(16) < 0.5)
    assert model_label_dropout(model.eval(), y) is None  # eval mode: nothing drawn
