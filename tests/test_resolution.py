"""Checkpoints trained at one resolution load at another (rectok/checkpoints/resolution.py and
load_tokenizer(img_size=) / load_dit(grid_size=) in rectok/checkpoints/loading.py).

Proves, with tiny models on CPU:
- a 64 px tokenizer (patch 16, grid 4), briefly trained and written as an export, a training run
  folder and an official-layout file, loads at 128 px: grid 8, each learned position embedding is
  exactly timm's bicubic resample_abs_pos_embed of the saved one, every other tensor is the saved
  one bit for bit, one log line says what was resampled (4x4 -> 8x8, 64 px -> 128 px), and it
  reconstructs a smooth 128 px image better than a flat grey image does;
- a kept EMA state (the decoder stage continues it) is resampled the same way and loads into the
  resized model's EMA;
- loading at the saved size (or without a size) gives exactly the saved tensors;
- a DiT^DH (export and official layout) loaded at another latent grid carries that grid's sin-cos
  table, the saved weights otherwise, and runs a forward at the new latent size;
- sizes the patch does not divide (or an empty grid) raise a one-line ValueError naming the fix.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from rectok.checkpoints import loading, resolution, store
from rectok.checkpoints.official import save_official
from rectok.models.dit import DiTDH, dit_config, eva_rope_table, sincos_pos_embed_2d
from rectok.models.tokenizer import RecTok, tokenizer_config, tokenizer_rope_table
from rectok.training.ema import EMA

POS = resolution.TOKENIZER_POS_EMBEDS
LAYOUTS = ["export", "run", "official"]


def _smooth(n: int, size: int, seed: int) -> torch.Tensor:
    """Images [n, 3, size, size] in [-1, 1]: random 4x4 colour grids, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(corners, size=(size, size), mode="bilinear", align_corners=True)


@pytest.fixture(scope="module")
def tokenizer() -> RecTok:
    """rectok-tiny (64 px, patch 16) trained for 60 autoencoding steps: enough to reconstruct."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = RecTok(tokenizer_config("rectok-tiny")).eval()  # eval: no masking, no noise
    assert (model.cfg.img_size, model.cfg.patch_size, model.cfg.grid_size) == (64, 16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(60):
        x = _smooth(8, 64, step)
        loss = F.mse_loss(model(x).images, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(before)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def tok_files(tokenizer, tmp_path_factory) -> dict:
    """The tokenizer written the ways this project writes it, and the tensors each file holds."""
    root = tmp_path_factory.mktemp("tok")
    full = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    ours = {k: v for k, v in full.items() if not k.startswith("semantic_decoder.")}  # dropped on load
    export = store.export_safetensors(root / "tok_ema.safetensors", full, tokenizer.cfg.to_dict())
    run = root / "run"
    state = {
        "model": full,
        "ema": EMA(tokenizer, 0.999).state_dict(),
        "model_config": tokenizer.cfg.to_dict(),
        "config": {"stage": "tokenizer"},
        "step": 3,
    }
    store.save_checkpoint(run, state, step=3)
    save_official(tokenizer, root / "official.safetensors")
    return {
        "export": (export, ours),
        "run": (run, ours),
        "official": (root / "official.safetensors", full),  # official files keep the semantic decoder
    }


def _expected_at(saved: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """The saved tensors with their position embeddings resampled by timm (no prefix tokens)."""
    out = dict(saved)
    for key in POS:
        if key in out:
            old = int(out[key].shape[1] ** 0.5)
            out[key] = resample_abs_pos_embed(out[key], [grid, grid], [old, old], num_prefix_tokens=0)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_loads_at_another_resolution(tok_files, layout, caplog):
    path, saved = tok_files[layout]
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.loading"):
        loaded = loading.load_tokenizer(path, img_size=128)
    model = loaded.model
    assert (model.cfg.img_size, model.cfg.grid_size, loaded.resampled_from) == (128, 8, 64)
    if layout != "official":
        assert loaded.config["img_size"] == 128
    lines = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(lines) == 1 and "4x4 to 8x8" in lines[0] and "64 px -> 128 px" in lines[0], lines

    got, expected = model.state_dict(), _expected_at(saved, 8)
    assert got.keys() == saved.keys()
    resampled = [k for k in POS if k in saved]
    assert len(resampled) == (3 if layout == "official" else 2)
    for key in resampled:
        assert got[key].shape == (1, 64, saved[key].shape[-1])
        assert torch.equal(got[key], expected[key]), key
    others = [k for k in saved if k not in resampled]
    assert others and all(torch.equal(got[k], saved[k]) for k in others)
    head_dim = model.cfg.encoder_width // model.cfg.encoder_heads
    assert torch.equal(model.encoder.rope_table, tokenizer_rope_table(8, head_dim))


def test_resampled_tokenizer_reconstructs_128px(tok_files):
    model = loading.load_tokenizer(tok_files["export"][0], img_size=128).model
    x = F.interpolate(_smooth(4, 64, 1234), size=(128, 128), mode="bilinear")  # a smooth 128 px image
    target = x * 0.5 + 0.5
    recon = model.reconstruct(x)
    assert recon.shape == (4, 3, 128, 128) and torch.isfinite(recon).all()
    err = F.mse_loss(recon, target).item()
    grey = F.mse_loss(torch.full_like(target, 0.5), target).item()
    print(f"128 px reconstruction MSE {err:.4f}, flat grey {grey:.4f}")
    assert err < 0.5 * grey


def test_kept_ema_state_is_resampled(tok_files, tokenizer):
    """The decoder stage loads keep_ema=True and continues the EMA on the resized model."""
    loaded = loading.load_tokenizer(tok_files["run"][0], use_ema=False, keep_ema=True, img_size=128)
    ema_state = loaded.raw["ema"]
    saved = EMA(tokenizer, 0.999).state_dict()
    expected = _expected_at(saved["params"], 8)
    for key in POS:
        assert torch.equal(ema_state["params"][key], expected[key]), key
    for name, table in ema_state["buffers"].items():  # RoPE tables, rebuilt for the new grid
        assert table.shape[0] == 64, name
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("semantic_decoder.")}  # noqa: E731
    ema = EMA(loaded.model, 0.999)
    ema.load_state_dict(
        {**ema_state, "params": keep(ema_state["params"]), "buffers": keep(ema_state["buffers"])}
    )
    assert torch.equal(ema.params["encoder.pos_embed"], expected["encoder.pos_embed"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_at_its_saved_size_is_unchanged(tok_files, layout, caplog):
    path, saved = tok_files[layout]
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.loading"):
        same = loading.load_tokenizer(path, img_size=64)
        default = loading.load_tokenizer(path)
    assert not [r for r in caplog.records if "resampled" in r.getMessage()]
    for loaded in (same, default):
        assert loaded.model.cfg.img_size == 64 and loaded.resampled_from is None
        got = loaded.model.state_dict()
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


@pytest.mark.parametrize("layout", ["export", "official"])
@pytest.mark.parametrize("img_size", [100, 8])
def test_size_the_patch_does_not_divide(tok_files, layout, img_size):
    with pytest.raises(
        ValueError, match="not a multiple of the tokenizer's patch size 16: pass a multiple"
    ) as err:
        loading.load_tokenizer(tok_files[layout][0], img_size=img_size)
    assert "\n" not in str(err.value)
    assert ("96 or 112" if img_size == 100 else "16 or 32") in str(err.value)


# ----------------------------------------------------------------------------- DiT^DH
@pytest.fixture(scope="module")
def dit_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(1)
    dit = DiTDH(dit_config("dit-dh-tiny", in_channels=16, grid_size=4, num_classes=3))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero everywhere: DiT^DH starts with zero adaLN / output layers
        for p in dit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    saved = {k: v.clone() for k, v in dit.state_dict().items()}
    export = store.export_safetensors(root / "dit_ema.safetensors", saved, asdict(dit.config))
    save_official(dit, root / "official.safetensors")
    return {"export": (export, saved), "official": (root / "official.safetensors", saved)}


@pytest.mark.parametrize("layout", ["export", "official"])
def test_dit_loads_at_another_grid(dit_files, layout, caplog):
    path, saved = dit_files[layout]
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.loading"):
        loaded = loading.load_dit(path, grid_size=8)
    model = loaded.model
    assert (model.config.grid_size, loaded.resampled_from) == (8, 4)
    lines = [r.getMessage() for r in caplog.records if "sin-cos" in r.getMessage()]
    assert len(lines) == 1 and "4x4 -> 8x8" in lines[0], lines

    got = model.state_dict()
    assert got.keys() == saved.keys()
    assert torch.equal(got["pos_embed"], sincos_pos_embed_2d(128, 8)[None])
    assert all(torch.equal(got[k], saved[k]) for k in saved if k != "pos_embed")
    assert torch.equal(model.trunk_rope, eva_rope_table(64, 8))

    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = model(x, torch.tensor([0.3, 0.7]), torch.tensor([0, 2]))
    assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 0


@pytest.mark.parametrize("layout", ["export", "official"])
def test_dit_at_its_saved_grid_is_unchanged(dit_files, layout):
    path, saved = dit_files[layout]
    for loaded in (loading.load_dit(path, grid_size=4), loading.load_dit(path)):
        assert loaded.model.config.grid_size == 4 and loaded.resampled_from is None
        got = loaded.model.state_dict()
        assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


def test_dit_empty_grid(dit_files):
    with pytest.raises(ValueError, match="grid_size 0 must be a positive number") as err:
        loading.load_dit(dit_files["export"][0], grid_size=0)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the functions
def test_resample_functions_touch_only_position_tensors():
    torch.manual_seed(4)
    tok = RecTok(tokenizer_config("rectok-tiny")).state_dict()
    out = resolution.resample_tokenizer_state(tok, 4, 6)
    assert all(out[k] is tok[k] for k in tok if k not in POS)
    assert all(out[k].shape == (1, 36, tok[k].shape[-1]) for k in POS)
    assert resolution.resample_tokenizer_state(tok, 4, 4) == tok
    with pytest.raises(ValueError, match=r"encoder.pos_embed \(1, 16, 192\) is not \[1, 5\*5, width\]"):
        resolution.resample_tokenizer_state(tok, 5, 6)

    dit = DiTDH(dit_config("dit-dh-tiny", in_channels=16)).state_dict()
    out = resolution.resample_dit_state(dit, 8, 3)
    assert all(out[k] is dit[k] for k in dit if k != "pos_embed")
    assert torch.equal(out["pos_embed"], sincos_pos_embed_2d(128, 3)[None])


def test_training_and_sampling_at_another_resolution(demo_16, tmp_path):
    """--tok.img_size: a 64 px demo tokenizer fine-tuned (stage 2) and a DiT^DH trained on its
    latents at 128 px; sample.py then samples 128 px images from that DiT^DH by itself."""
    from conftest import load_script

    train, sample = load_script("train.py"), load_script("sample.py")
    common = [
        "--data.path", str(demo_16), "--global_batch", "4", "--micro_batch", "4", "--max_steps", "1",
        "--log_every", "1", "--image_every", "0", "--ckpt_every", "0", "--tensorboard", "false",
        "--data.eval_images", "2", "--data.num_workers", "0",
    ]  # fmt: skip
    train.main([*common, "--run_dir", str(tmp_path / "tok")])
    stage2 = ["--stage", "decoder", "--tok.init_from", str(tmp_path / "tok"), "--tok.img_size", "128"]
    dec = train.main([*common, "--run_dir", str(tmp_path / "dec"), *stage2])
    assert dec["model"].cfg.img_size == 128 and dec["model"].cfg.grid_size == 8
    dit_args = ["--stage", "dit", "--dit.tokenizer_ckpt", str(tmp_path / "tok"), "--tok.img_size", "128"]
    dit = train.main([*common, "--run_dir", str(tmp_path / "dit"), *dit_args, "--dit.sample_steps", "2"])
    assert dit["model"].config.grid_size == 8
    out = sample.main(
        ["--dit", str(tmp_path / "dit"), "--num-points", "2", "--per-class", "1", "--classes", "0",
         "--device", "cpu", "--out", str(tmp_path / "s"), "--no-progress", "--name", "s"]
    )  # fmt: skip
    assert out is not None
    import numpy as np

    with np.load(tmp_path / "s" / "s.npz") as f:
        assert f["arr_0"].shape == (1, 128, 128, 3)
    with pytest.raises(ValueError, match="not a multiple of"):
        train.main([*common, "--run_dir", str(tmp_path / "bad"), *dit_args[:-1], "100"])
