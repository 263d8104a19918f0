"""DiT^DH and the Euler sampler compute what the official release computes, and its checkpoints load.

Proves, against the official fixtures (../shared/fixtures/official, float32 on CPU):
- our DiTDH, built from the official state dicts with every size inferred from tensor
  shapes, reproduces net_out, weak_net_out and net_out_null_class within
  1e-5 * max(1, max|ref|);
- time_grid and euler_sample reproduce the official time grid and the three sampler
  results (no guidance, AutoGuidance w = 1.29, CFG w = 1.29) to the same tolerance;
- dit_to_official inverts dit_from_official exactly, also through save_official to .safetensors
  and .pth and rectok.checkpoints.official.load_official_dit;
- broken checkpoints (missing, unexpected, mis-shaped entries, a RoPE that does not fit)
  fail with a ValueError naming the problem.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rectok.checkpoints import official
from rectok.checkpoints.official_dit import dit_from_official, dit_to_official, infer_config
from rectok.models.dit import DiTDH, DiTDHConfig
from rectok.sampling.euler import euler_sample, time_grid

TOL = 1e-5


@functools.cache
def _io(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "dit_dh_tiny_io.safetensors"))


@functools.cache
def _state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))


@functools.cache
def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())["dit_dh_tiny"]


def _models(folder: Path) -> tuple[DiTDH, DiTDH]:
    return (
        dit_from_official(_state(folder, "dit_dh_tiny_official_state")),
        dit_from_official(_state(folder, "dit_dh_tiny_weak_official_state")),
    )


def _check(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err = (ours - ref).abs().max().item()
    bound = TOL * max(1.0, ref.abs().max().item())
    print(f"{name}: max |ours - ref| = {err:.3e} (bound {bound:.1e})")
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.1e}"


def test_inferred_sizes_match_meta(official_fixtures):
    meta = _meta(official_fixtures)
    for prefix, state in (("", "dit_dh_tiny_official_state"), ("weak_", "dit_dh_tiny_weak_official_state")):
        cfg = infer_config(_state(official_fixtures, state))
        assert cfg.hidden_size == tuple(meta[f"{prefix}hidden_size"])
        assert cfg.depth == tuple(meta[f"{prefix}depth"])
        assert cfg.num_heads == tuple(meta[f"{prefix}num_heads"])
        assert cfg.in_channels == meta["token_channels"]
        assert cfg.grid_size == meta["img_size"] // meta["tokenizer_patch_size"]
        assert cfg.num_classes == meta["num_classes"]


@pytest.mark.parametrize("name", ["net_out", "weak_net_out", "net_out_null_class"])
def test_forward_parity(official_fixtures, name):
    io = _io(official_fixtures)
    model, weak = _models(official_fixtures)
    y = io["y"]
    if name == "net_out_null_class":
        y = torch.full_like(y, _meta(official_fixtures)["num_classes"])
    net = weak if name == "weak_net_out" else model
    with torch.no_grad():
        _check(name, net(io["x"], io["t"], y), io[name])


def test_time_grid_parity(official_fixtures):
    meta = _meta(official_fixtures)
    grid = time_grid(meta["num_sampling_steps"], meta["timestep_shift"])
    _check("sample_time_grid", grid, _io(official_fixtures)["sample_time_grid"])


@pytest.mark.parametrize(
    "name, guidance",
    [
        ("sample_euler_noguide", "none"),
        ("sample_euler_autoguidance", "autoguidance"),
        ("sample_euler_cfg", "cfg"),
    ],
)
def test_sampler_parity(official_fixtures, name, guidance):
    io, meta = _io(official_fixtures), _meta(official_fixtures)
    model, weak = _models(official_fixtures)
    out = euler_sample(
        model,
        io["sample_noise"],
        io["y"],
        num_points=meta["num_sampling_steps"],
        shift=meta["timestep_shift"],
        guidance=guidance,
        scale=meta["guidance_scale"] if guidance != "none" else 1.0,
        weak=weak if guidance == "autoguidance" else None,
    )
    _check(name, out, io[name])


def test_dit_to_official_is_exact_inverse(official_fixtures):
    state = _state(official_fixtures, "dit_dh_tiny_official_state")
    back = dit_to_official(dit_from_official(state))
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("fmt", ["dict", ".safetensors", ".pth"])
def test_round_trip_through_official_files(official_fixtures, tmp_path, fmt):
    io = _io(official_fixtures)
    model = dit_from_official(_state(official_fixtures, "dit_dh_tiny_weak_official_state"))
    if fmt == "dict":
        src = dit_to_official(model)
    else:
        src = tmp_path / f"dit{fmt}"
        official.save_official(model, src)
    again = official.load_official_dit(src)
    assert again.config == model.config
    with torch.no_grad():
        assert torch.equal(again(io["x"], io["t"], io["y"]), model(io["x"], io["t"], io["y"]))


def test_heads_without_rope_buffers(official_fixtures):
    """EMA copies hold parameters only: heads then come from num_heads (or the official size table)."""
    io = _io(official_fixtures)
    state = {
        k: v
        for k, v in _state(official_fixtures, "dit_dh_tiny_official_state").items()
        if "feat_rope" not in k
    }
    with pytest.raises(ValueError, match="num_heads"):
        dit_from_official(state)  # width 128 is not an official size
    model = dit_from_official(state, num_heads=(2, 3))
    with torch.no_grad():
        _check("net_out (no rope buffers)", model(io["x"], io["t"], io["y"]), io["net_out"])


def test_official_size_table_used_for_official_widths():
    with torch.device("meta"):
        model = DiTDH(DiTDHConfig(hidden_size=(384, 2048), depth=(1, 1), num_heads=(6, 16), grid_size=2))
    state = {k: v for k, v in dit_to_official(model).items() if "feat_rope" not in k}
    assert infer_config(state).num_heads == (6, 16)


def test_equal_widths_need_depth():
    model = DiTDH(
        DiTDHConfig(in_channels=8, grid_size=2, hidden_size=(32, 32), depth=(2, 1), num_heads=(2, 2))
    )
    state = dit_to_official(model)
    assert "s_projector.weight" not in state
    with pytest.raises(ValueError, match="depth"):
        dit_from_official(state)
    assert dit_from_official(state, depth=(2, 1)).config == model.config


def _broken(state: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], str]:
    state = dict(state)
    if kind == "missing":
        del state["blocks.1.mlp.w3.bias"]
        return state, "blocks.1.mlp.w3.bias"
    if kind == "unexpected":
        state["blocks.0.attn.q_norm.weight"] = torch.ones(64)
        return state, "blocks.0.attn.q_norm.weight"
    if kind == "wrong_shape":
        state["final_layer.linear.weight"] = torch.zeros(128, 191)
        return state, "final_layer.linear.weight"
    if kind == "rope_mismatch":  # explicit head count contradicts the saved RoPE buffers
        return state, "enc_feat_rope"
    if kind == "no_sizes":
        del state["pos_embed"]
        return state, "pos_embed"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong_shape", "rope_mismatch", "no_sizes"])
def test_broken_checkpoints_fail_clearly(official_fixtures, tmp_path, kind):
    state, culprit = _broken(_state(official_fixtures, "dit_dh_tiny_official_state"), kind)
    heads = (4, 3) if kind == "rope_mismatch" else None
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        dit_from_official(state, num_heads=heads)
    path = tmp_path / "broken.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        official.load_official_dit(path, num_heads=heads)
