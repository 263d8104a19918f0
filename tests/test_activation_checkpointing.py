"""Activation checkpointing per transformer block (`--activation_checkpointing`).

Proves: with it on, a tokenizer training run gives exactly the same losses and weights as without
(the recomputed blocks draw nothing random), a DiT^DH step gives exactly the same loss and grads,
it keeps fewer activations for backward (bench/memory.py's measure), and eval / no-grad forwards
are untouched; checkpointing composes with torch.compile'd blocks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from rectok.models.dit import DiTDH, dit_config
from rectok.models.layers import set_activation_checkpointing
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.training.compiling import compile_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory  # noqa: E402

train = load_script("train.py")


def _run(data: Path, run_dir: Path, *extra: str) -> dict:
    return train.main([
        "--data.path", str(data), "--run_dir", str(run_dir), "--global_batch", "4", "--micro_batch", "4",
        "--max_steps", "3", "--log_every", "1", "--image_every", "0", "--ckpt_every", "0",
        "--tensorboard", "false", "--data.eval_images", "2", "--data.num_workers", "0", *extra,
    ])  # fmt: skip


def test_tokenizer_training_is_identical_with_checkpointing(demo_16, tmp_path):
    plain = _run(demo_16, tmp_path / "plain")
    ckpt = _run(demo_16, tmp_path / "ckpt", "--activation_checkpointing", "true")
    assert plain["history"] == ckpt["history"]
    for (name, a), (_, b) in zip(plain["model"].state_dict().items(), ckpt["model"].state_dict().items()):
        assert torch.equal(a, b), name


def _dit_step(model: DiTDH, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = _dit_forward(model, x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads


def _dit_forward(model: DiTDH, x: torch.Tensor) -> torch.Tensor:
    t, y = torch.full((x.shape[0],), 0.3), torch.arange(x.shape[0]) % 10
    return model(x, t, y, label_drop=torch.zeros(x.shape[0], dtype=torch.bool)).square().mean()


def test_dit_step_is_identical_and_keeps_fewer_activations():
    torch.manual_seed(0)
    model = DiTDH(dit_config("dit-dh-tiny", in_channels=16, grid_size=4)).train()
    x = torch.randn(4, 16, 4, 4)
    loss, grads = _dit_step(model, x)
    plain_bytes = memory.saved_activation_bytes(lambda: _dit_forward(model, x), model)
    assert set_activation_checkpointing(model) == 1
    loss_c, grads_c = _dit_step(model, x)
    assert torch.equal(loss, loss_c) and all(torch.equal(a, b) for a, b in zip(grads, grads_c))
    ckpt_bytes = memory.saved_activation_bytes(lambda: _dit_forward(model, x), model)
    assert ckpt_bytes < 0.7 * plain_bytes, (ckpt_bytes, plain_bytes)
    with torch.no_grad():  # inference never checkpoints: the same output with the flag on or off
        on = _dit_forward(model.eval(), x)
        set_activation_checkpointing(model, False)
        assert torch.equal(on, _dit_forward(model, x))


def test_tokenizer_keeps_fewer_activations_and_composes_with_compile():
    torch.manual_seed(0)
    tok = RecTok(tokenizer_config("rectok-tiny", mask_ratio_min=0.0, mask_ratio_max=0.0)).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1

    def step() -> torch.Tensor:
        torch.manual_seed(1)  # the same masking / noise draws every call
        out = tok(x)
        return out.images.square().mean() + out.semantic.square().mean()

    plain = memory.saved_activation_bytes(step, tok)
    assert set_activation_checkpointing(tok) == 3  # encoder, pixel decoder, semantic decoder
    assert memory.saved_activation_bytes(step, tok) < 0.7 * plain
    reference = torch.autograd.grad(step(), list(tok.parameters()))
    compile_blocks(tok)
    compiled = torch.autograd.grad(step(), list(tok.parameters()))
    for a, b in zip(reference, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1])
def test_memory_table_rejects_bad_batches(bad):  # and the table itself: see test_memory_table
    with pytest.raises(SystemExit):
        memory.main(["--batches", str(bad), "--out", ""])


def test_memory_table(tmp_path):
    rows = memory.main(["--batches", "1,2", "--device", "cpu", "--out", str(tmp_path)])
    assert len(rows) == 2 * 2 * 2  # tokenizer and DiT^DH, two batches, checkpointing off / on
    for off, on in zip(rows[::2], rows[1::2]):
        assert (off["checkpointing"], on["checkpointing"]) == (False, True)
        assert 0 < on["saved_MB"] < off["saved_MB"] and off["peak_GB"] is None  # no CUDA here
    two, one = rows[2], rows[0]
    assert two["saved_MB"] > 1.5 * one["saved_MB"]  # activations grow with the batch
    table = next(tmp_path.glob("memory-*-cpu.md")).read_text()
    assert "| rectok-tiny | 2 | True |" in table
