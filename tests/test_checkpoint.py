"""Checkpoints (rectok/checkpoints/store.py).

Proves: a full training state (model, EMA, optimizer, scaler, RNG states, config, data
position) round-trips through torch.load(weights_only=True) and continues training
bit-identically; RNG states restore Python, numpy and torch streams exactly; writes are
atomic (a failing write leaves the previous file and no temp file), `latest` and the
manifest (with sha256) follow the newest file, keep-last-N prunes; non-finite weights
are never written; resume values resolve to (path, loaded state) (damaged files and used
run folders: test_resume_faults.py); safetensors export carries the config.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from rectok.checkpoints import store
from rectok.training.ema import EMA


def _draws() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3),
    )


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()
    torch.save(store.rng_state(), tmp_path / "rng.pt")
    first = _draws()
    _draws()  # move everything on
    store.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = _draws()
    assert first[:4] == second[:4]
    assert torch.equal(first[4], second[4])


def _train_state(model, opt, ema, step):
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "step": step,
        "epoch": 0,
        "data": {"epoch": 0, "batch": step},
        "rng": store.rng_state(),
        "config": {"optim": {"lr": 0.01}, "stage": "tokenizer"},
    }


def _step(model, opt, ema, x):
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema.update(model)
    return loss.item()


def test_training_state_roundtrip_continues_bit_identically(tmp_path):
    torch.manual_seed(0)
    xs = torch.randn(6, 4, 3)
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    ema = EMA(model, 0.9)
    for i in range(3):
        _step(model, opt, ema, xs[i])
    path = store.save_checkpoint(tmp_path, _train_state(model, opt, ema, 3), step=3)
    reference = [_step(model, opt, ema, xs[i]) for i in range(3, 6)]

    state = store.load_checkpoint(tmp_path)  # the run folder resolves to `latest`
    assert state["step"] == 3 and state["config"]["optim"]["lr"] == 0.01 and state["data"]["batch"] == 3
    model2 = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 1))
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    opt2.load_state_dict(state["optimizer"])
    ema2 = EMA(model2, 0.5)
    ema2.load_state_dict(state["ema"])
    resumed = [_step(model2, opt2, ema2, xs[i]) for i in range(3, 6)]
    assert resumed == reference
    for k in ema.params:
        assert torch.equal(ema.params[k], ema2.params[k])
    assert store.verify_checkpoint(path)


def test_latest_manifest_and_keep_last(tmp_path):
    model = nn.Linear(2, 2)
    for step in (10, 20, 30, 40):
        store.save_checkpoint(
            tmp_path, {"model": model.state_dict(), "config": {"s": step}}, step=step, keep_last=2
        )
    names = [p.name for p in store.list_checkpoints(tmp_path)]
    assert names == [store.checkpoint_name(30), store.checkpoint_name(40)]
    assert (tmp_path / "latest").read_text().strip() == store.checkpoint_name(40)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == set(names)
    assert manifest[names[-1]]["step"] == 40 and manifest[names[-1]]["config"] == {"s": 40}
    assert manifest[names[-1]]["sha256"] == store.sha256(tmp_path / names[-1])
    assert not list(tmp_path.glob(".*.tmp"))
    # a flipped byte is detected by the manifest hash
    raw = bytearray((tmp_path / names[-1]).read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / names[-1]).write_bytes(bytes(raw))
    assert not store.verify_checkpoint(tmp_path / names[-1])


def test_non_finite_weights_are_never_written(tmp_path):
    model = nn.Linear(2, 2)
    store.save_checkpoint(tmp_path, {"model": model.state_dict()}, step=1)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        store.save_checkpoint(tmp_path, {"model": model.state_dict()}, step=2)
    ema_state = {"params": {"w": torch.tensor([float("inf")])}, "buffers": {}}
    with pytest.raises(FloatingPointError, match="ema"):
        store.save_checkpoint(tmp_path, {"model": nn.Linear(2, 2).state_dict(), "ema": ema_state}, step=3)
    assert [p.name for p in store.list_checkpoints(tmp_path)] == [store.checkpoint_name(1)]
    assert store.latest_checkpoint(tmp_path).name == store.checkpoint_name(1)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    store.atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_resolve_resume(tmp_path):
    assert store.resolve_resume("", tmp_path) == (None, None)
    assert store.resolve_resume("auto", tmp_path) == (None, None)  # nothing yet: start fresh
    path = store.save_checkpoint(tmp_path, {"model": {}, "step": 5}, step=5)
    assert store.resolve_resume("auto", tmp_path)[0] == path
    assert store.resolve_resume("auto", tmp_path)[1]["step"] == 5
    assert store.resolve_resume(str(tmp_path), tmp_path / "elsewhere")[0] == path
    assert store.resolve_resume(str(path), tmp_path)[0] == path
    assert store.resolve_resume("never", tmp_path) == (None, None)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        store.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        store.resolve_resume(str(tmp_path / "sub"), tmp_path)


class _Evil:
    """An arbitrary class: unpickling it would run code, so weights_only must refuse it."""


def test_load_refuses_pickled_objects(tmp_path):
    torch.save({"model": _Evil()}, tmp_path / "ckpt_000000001.pt")
    with pytest.raises(ValueError, match="weights_only"):
        store.load_checkpoint(tmp_path / "ckpt_000000001.pt")


def test_safetensors_export_with_config(tmp_path):
    model = nn.Linear(3, 2)
    cfg = {"tokenizer": {"token_channels": 16}, "name": "rectok-tiny"}
    path = store.export_safetensors(tmp_path / "w.safetensors", model.state_dict(), cfg, step=7, ema=True)
    state, meta = store.read_safetensors(path)
    assert meta["config"] == cfg and meta["step"] == 7 and meta["ema"] is True
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    bad = {"w": torch.tensor([float("nan")])}
    with pytest.raises(FloatingPointError):
        store.export_safetensors(tmp_path / "bad.safetensors", bad, cfg)
    assert not (tmp_path / "bad.safetensors").exists()
