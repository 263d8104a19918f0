"""Teacher weights (rectok/models/teacher_weights.py): what this file proves.

Every layout users have loads, offline, into a timm model whose features equal the original's:
- DINOv3, HF transformers (folder, the model.safetensors file with its config.json, an HF hub cache
  repo, found offline by repo id): equal to transformers 4.56.1's own DINOv3ViTModel output on a
  recorded fixture (plain and gated MLP, non-square input), all tokens (class, registers, patches);
  the real ViT-L/16 HF layout maps name for name and shape for shape onto timm's ViT-L (meta device).
- DINOv3, Meta's original .pth (fused qkv.bias with a masked k third, bias_mask, bf16 rope periods,
  storage tokens, mask token) and timm's layout with and without q/v-bias tensors.
- Non-zero q/v biases are never dropped: in all three DINOv3 layouts they select the `_qkvb` variant
  (the features then equal the bias-carrying reference, which the bias-free model misses by far) or,
  when a plain model is named explicitly, raise. All-zero biases use the plain variant.
- DINOv2: timm's and Meta's layouts and the official {"model_state_dict": ...} wrapper, with the
  518 px position embedding resampled to the teacher's grid exactly as timm's own loader does; HF
  Dinov2Model equal to transformers' output.
- Files are read safely (weights_only=True, safetensors) and every user mistake (missing file, empty
  folder, nothing cached, corrupt or pickled-code files, wrong family, width, heads or patch size,
  a key bias, a truncated HF file) gives a FileNotFoundError / ValueError saying what was wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from rectok.models.teacher_weights import (
    convert_state_dict,
    find_teacher_weights,
    load_teacher_model,
    read_state_dict,
    resolve_teacher_weights,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "release"
DINOV3 = "vit_small_patch16_dinov3"
DINOV3_QKVB = "vit_small_patch16_dinov3_qkvb"
TINY = dict(embed_dim=64, depth=2, num_heads=2, img_size=64, num_classes=0)
DINOV2 = "vit_small_patch14_dinov2.lvd142m"
TINY_V2 = dict(embed_dim=32, depth=2, num_heads=2, num_classes=0)
# The HF fixtures and the timm models (and create kwargs) that must reproduce them.
HF_FIXTURES = {
    "hf_dinov3_tiny": (DINOV3, TINY),
    "hf_dinov3_tiny_gated": (
        "vit_small_plus_patch16_dinov3",
        dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=3, img_size=32, num_classes=0),
    ),
    "hf_dinov2_tiny": ("vit_small_patch14_dinov2", dict(TINY_V2, img_size=56)),
}


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, zero_qv_bias: bool = False) -> torch.nn.Module:
    """Every parameter random and O(1) in effect: timm's init (layer scale 1e-5, zero biases) would
    leave whole branches, and so their conversion, invisible in the features."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("gamma_1", "gamma_2", ".gamma")):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif p.ndim >= 2 and "token" not in name and "pos_embed" not in name:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
        else:
            p.copy_(torch.randn(p.shape, generator=g))
        if zero_qv_bias and name.endswith(("q_bias", "v_bias")):
            p.zero_()
    return model.eval()


def _tiny(name: str, seed: int = 0, zero_qv_bias: bool = False, **kwargs) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, **(kwargs or TINY))
    return _randomize(model, seed, zero_qv_bias)


@torch.no_grad()
def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval().forward_features(x)  # [B, prefix + patches, D] after the final norm


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> float:
    """got == want to `tol` relative to the features' scale; returns that relative error."""
    assert got.shape == want.shape
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= tol, f"max error {err:.3g} of the features' scale"
    return err


def _meta_dinov3_layout(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict written the way Meta's dinov3 repo saves it (independent of our code)."""
    g = torch.Generator().manual_seed(seed)
    dim = state["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, dim), "rope_embed.periods": torch.rand(dim // 2 // 2).bfloat16()}
    for k, v in state.items():
        if k.endswith("attn.q_bias"):
            # Meta's LinearKMaskedBias keeps a k bias in the file and masks it out at run time:
            # junk there must not matter.
            v_bias = state[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.randn(dim, generator=g), v_bias])
            mask = torch.ones(3 * dim)
            mask[dim : 2 * dim] = 0
            out[k.replace("q_bias", "qkv.bias_mask")] = mask
        elif not k.endswith("attn.v_bias"):
            k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
            out[k.replace("gamma_2", "ls2.gamma")] = v
    return out


# ---------------------------------------------------------------- DINOv3, HF transformers


@pytest.mark.parametrize("fixture", ["hf_dinov3_tiny", "hf_dinov3_tiny_gated", "hf_dinov2_tiny"])
@pytest.mark.parametrize("point_at", ["folder", "file"])
def test_hf_fixture_matches_transformers(fixture, point_at, no_network):
    """Recorded with transformers 4.56.1 (tests/fixtures/release/README.md): the same weights through
    our conversion into timm give the same last_hidden_state, every token."""
    name, kwargs = HF_FIXTURES[fixture]
    folder = FIXTURES / fixture
    path = folder if point_at == "folder" else folder / "model.safetensors"  # config.json found beside it
    model, source = load_teacher_model(path, name, auto_qkv_bias=True, **kwargs)
    assert source == str(folder / "model.safetensors")
    if "dinov3" in fixture:  # HF's q/v biases are non-zero in the fixture: the `_qkvb` variant holds them
        assert model.blocks[0].attn.q_bias is not None
    expected = load_file(str(folder / "expected.safetensors"))
    got = _features(model, expected["pixel_values"])
    # float32 rounding of another op order only (fused qkv, RoPE angle arithmetic): measured <= 4.2e-7.
    _assert_close(got, expected["last_hidden_state"])


def test_hf_dinov3_from_hub_cache(tmp_path, no_network):
    """The HF repo as `from_pretrained` caches it (models--facebook--.../snapshots/<rev>/) is found by
    repo id with no network, and also when pointed at directly."""
    repo = tmp_path / "hub" / "models--facebook--dinov3-vits16-pretrain-lvd1689m"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "hf_dinov3_tiny" / f, snapshot / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    expected = load_file(str(FIXTURES / "hf_dinov3_tiny" / "expected.safetensors"))

    name = f"{DINOV3}.lvd1689m"
    assert find_teacher_weights(name, tmp_path / "hub") == snapshot
    for weights, cache in ((None, tmp_path / "hub"), (repo, None)):
        model, source = load_teacher_model(weights, name, cache_dir=cache, auto_qkv_bias=True, **TINY)
        assert source == str(snapshot / "model.safetensors")
        _assert_close(_features(model, expected["pixel_values"]), expected["last_hidden_state"])


def test_timm_hub_repo_of_either_variant_found(tmp_path, x, no_network):
    """A cached timm repo is found for the plain name also when it is the `_qkvb` repo."""
    source = _tiny(DINOV3_QKVB, seed=1)
    snapshot = tmp_path / "hub" / f"models--timm--{DINOV3_QKVB}.lvd1689m" / "snapshots" / "r1"
    snapshot.mkdir(parents=True)
    save_file(_state(source), str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("r1")
    model, path = load_teacher_model(
        None, f"{DINOV3}.lvd1689m", cache_dir=tmp_path / "hub", auto_qkv_bias=True, **TINY
    )
    assert path == str(snapshot / "model.safetensors")
    _assert_close(_features(model, x), _features(source, x))


def test_nothing_cached_says_where_to_get_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_teacher_weights(None, "dinov3", cache_dir=tmp_path / "empty", num_classes=0)
    msg = str(info.value)
    for needle in (
        "huggingface-cli download timm/vit_large_patch16_dinov3.lvd1689m",
        "huggingface-cli download facebook/dinov3-vitl16-pretrain-lvd1689m config.json model.safetensors",
        "--tok.teacher_weights",
    ):
        assert needle in msg


def test_vitl16_hf_layout_maps_onto_timm_on_meta():
    """The real facebook/dinov3-vitl16-pretrain-lvd1689m layout (415 tensors, recorded from transformers)
    converts to exactly timm's ViT-L/16 keys and shapes; its (zero) biases pick the plain model, a
    non-zero one the `_qkvb` model. Only the bias values (which decide the variant) are real tensors."""
    layout = json.loads((FIXTURES / "hf_dinov3_vitl16_layout.json").read_text())
    assert len(layout["tensors"]) == 415

    def state(q_bias: float) -> dict[str, torch.Tensor]:
        out = {}
        for key, shape in layout["tensors"].items():
            if key.endswith("_proj.bias") and ".attention." in key:
                out[key] = torch.full(shape, q_bias if key == "layer.7.attention.q_proj.bias" else 0.0)
            else:
                out[key] = torch.empty(shape, device="meta")
        return out

    kwargs = dict(num_classes=0, img_size=256)
    for q_bias, want in (
        (0.0, "vit_large_patch16_dinov3.lvd1689m"),
        (0.5, "vit_large_patch16_dinov3_qkvb.lvd1689m"),
    ):
        name, converted, layout_name = convert_state_dict(
            state(q_bias), "dinov3", config=layout["config"], **kwargs
        )
        assert name == want and "HF transformers" in layout_name
        with torch.device("meta"):
            reference = timm.create_model(want, pretrained=False, **kwargs).state_dict()
        assert {k: tuple(v.shape) for k, v in converted.items()} == {
            k: tuple(v.shape) for k, v in reference.items()
        }
    assert float(converted["blocks.7.attn.q_bias"].abs().max()) == 0.5
    # The alias chose by itself; the plain model named explicitly refuses the non-zero bias.
    with pytest.raises(ValueError, match="Use vit_large_patch16_dinov3_qkvb.lvd1689m, or an alias"):
        convert_state_dict(state(0.5), "vit_large_patch16_dinov3.lvd1689m", config=layout["config"], **kwargs)


def test_hf_config_must_match_the_teacher(tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf_dinov3_tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "rope_theta": 10.0}))
    # Heads and RoPE base are invisible in the tensor shapes: only config.json can tell.
    with pytest.raises(ValueError, match=r"num_attention_heads=4 \(teacher: 2\).*rope_theta=10.0"):
        resolve_teacher_weights(folder, DINOV3, auto_qkv_bias=True, **TINY)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dinov2"}))
    with pytest.raises(ValueError, match="model_type 'dinov2'"):
        resolve_teacher_weights(folder, DINOV3, auto_qkv_bias=True, **TINY)


def test_hf_key_bias_and_truncated_file_refused():
    state = read_state_dict(FIXTURES / "hf_dinov3_tiny" / "model.safetensors")
    state["layer.1.attention.k_proj.bias"] = torch.full((64,), 0.1)
    # timm's DINOv3 has no key bias (Meta masks it): loading would silently drop it.
    with pytest.raises(ValueError, match="non-zero key bias"):
        convert_state_dict(state, DINOV3, auto_qkv_bias=True, **TINY)
    del state["layer.1.attention.k_proj.bias"], state["layer.1.attention.k_proj.weight"]
    with pytest.raises(
        ValueError, match="incomplete HF DINOv3 checkpoint: no layer.1.attention.k_proj.weight"
    ):
        convert_state_dict(state, DINOV3, auto_qkv_bias=True, **TINY)


# ---------------------------------------------------------------- DINOv3, Meta and timm layouts


@pytest.mark.parametrize("nonzero", [True, False])
def test_meta_dinov3_pth(tmp_path, x, nonzero, no_network):
    """Meta's layout: non-zero q/v biases load into `_qkvb`; all-zero ones (the released distilled
    ViT-L) into the plain model; either way the features are the original's."""
    reference = _tiny(DINOV3_QKVB, seed=2, zero_qv_bias=not nonzero)
    path = tmp_path / "dinov3_meta.pth"
    torch.save(_meta_dinov3_layout(_state(reference)), path)
    model, _ = load_teacher_model(path, DINOV3, auto_qkv_bias=True, **TINY)
    assert (model.blocks[0].attn.q_bias is not None) == nonzero
    _assert_close(_features(model, x), _features(reference, x))


@pytest.mark.parametrize(
    "file_model, zero_qv_bias, requested, want",
    [
        (DINOV3, False, DINOV3, DINOV3),  # plain file, no bias keys
        (DINOV3_QKVB, False, DINOV3, DINOV3_QKVB),  # q_bias / v_bias tensors, non-zero: auto-picked
        (DINOV3_QKVB, True, DINOV3_QKVB, DINOV3),  # zero biases: the plain, faster model
    ],
)
def test_timm_dinov3(tmp_path, x, file_model, zero_qv_bias, requested, want, no_network):
    reference = _tiny(file_model, seed=3, zero_qv_bias=zero_qv_bias)
    path = tmp_path / "dinov3_timm.safetensors"
    save_file(_state(reference), str(path))
    resolved = resolve_teacher_weights(path, requested, auto_qkv_bias=True, **TINY)
    assert resolved.model_name == want and resolved.layout == "DINOv3, timm layout"
    model, _ = load_teacher_model(path, requested, auto_qkv_bias=True, **TINY)
    _assert_close(_features(model, x), _features(reference, x))


def test_explicit_qkvb_name_loads_bias_free_file(tmp_path, x):
    reference = _tiny(DINOV3, seed=4)
    path = tmp_path / "plain.safetensors"
    save_file(_state(reference), str(path))
    model, _ = load_teacher_model(path, DINOV3_QKVB, **TINY)  # named explicitly: kept, biases zero
    assert model.blocks[0].attn.q_bias is not None and not model.blocks[0].attn.q_bias.any()
    _assert_close(_features(model, x), _features(reference, x))


def _biased_file(fmt: str, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(file with non-zero q/v biases, input, its true features, the features without the biases)."""
    if fmt == "hf":
        expected = load_file(str(FIXTURES / "hf_dinov3_tiny" / "expected.safetensors"))
        state = read_state_dict(FIXTURES / "hf_dinov3_tiny" / "model.safetensors")
        _, timm_state, _ = convert_state_dict(state, DINOV3_QKVB, **TINY)
        stripped = timm.create_model(DINOV3, pretrained=False, **TINY)
        stripped.load_state_dict({k: v for k, v in timm_state.items() if "_bias" not in k})
        pixels = expected["pixel_values"]
        return FIXTURES / "hf_dinov3_tiny", pixels, expected["last_hidden_state"], _features(stripped, pixels)
    reference = _tiny(DINOV3_QKVB, seed=5)
    stripped = timm.create_model(DINOV3, pretrained=False, **TINY)
    stripped.load_state_dict({k: v for k, v in _state(reference).items() if "_bias" not in k})
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    path = tmp_path / f"biased_{fmt}.pth"
    torch.save(_meta_dinov3_layout(_state(reference)) if fmt == "meta" else _state(reference), path)
    return path, pixels, _features(reference, pixels), _features(stripped, pixels)


@pytest.mark.parametrize("fmt", ["meta", "timm", "hf"])
def test_nonzero_biases_never_dropped(tmp_path, fmt):
    """The failure this guards against: the bias-free model misses the features by far (> 1%); our
    loader either holds the biases (auto / alias) or refuses the explicitly named plain model."""
    path, pixels, truth, without_biases = _biased_file(fmt, tmp_path)
    assert float((without_biases - truth).abs().max() / truth.abs().max()) > 1e-2
    with pytest.raises(ValueError, match="non-zero query/value biases.*vit_small_patch16_dinov3_qkvb"):
        resolve_teacher_weights(path, DINOV3, **TINY)  # explicit plain name: never silently
    model, _ = load_teacher_model(path, DINOV3, auto_qkv_bias=True, **TINY)
    _assert_close(_features(model, pixels), truth)


def test_timm_loader_alone_would_drop_the_biases(tmp_path):
    """Why the biases are inspected before building: timm's own loader (the teacher's previous path)
    loads Meta's non-zero biases into the plain model by dropping them (printing one line per block)."""
    path, pixels, truth, _ = _biased_file("meta", tmp_path)
    plain = timm.create_model(DINOV3, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert float((_features(plain, pixels) - truth).abs().max() / truth.abs().max()) > 1e-2


# ---------------------------------------------------------------- DINOv2


@pytest.fixture
def dinov2_native(tmp_path) -> tuple[torch.nn.Module, Path]:
    """A tiny DINOv2 at timm's native 518 px (37 x 37 positions), saved in timm's layout."""
    model = _tiny("vit_small_patch14_dinov2", seed=6, **TINY_V2)
    assert model.pos_embed.shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_timm.safetensors"
    save_file(_state(model), str(path))
    return model, path


@pytest.mark.parametrize("fmt", ["timm", "meta", "official"])
def test_dinov2_layouts_resampled_like_timm(tmp_path, dinov2_native, fmt, no_network):
    """All DINOv2 layouts give the model timm's own loader builds from the timm file at the teacher's
    grid (56 px -> 4 x 4: position embedding resampled bicubic, antialiased)."""
    native, timm_path = dinov2_native
    state = _state(native)
    if fmt == "timm":
        path = timm_path
    else:
        meta = {**state, "mask_token": torch.zeros(1, 32)}  # Meta's pretraining-only token
        path = tmp_path / ("dinov2_meta.pth" if fmt == "meta" else "teacher.bin")
        torch.save(meta if fmt == "meta" else {"model_state_dict": meta, "epoch": 3}, path)
    kwargs = dict(TINY_V2, img_size=56)
    want = timm.create_model(
        DINOV2, pretrained=True, pretrained_cfg_overlay=dict(file=str(timm_path)), **kwargs
    )
    model, _ = load_teacher_model(path, DINOV2, **kwargs)
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(_features(model, x), _features(want, x), rtol=0, atol=0)
    assert not torch.allclose(model.pos_embed[:, 1:], native.pos_embed[:, 1:17])  # really resampled


# ---------------------------------------------------------------- user mistakes


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_teacher_weights(tmp_path / "nope.safetensors", DINOV3, **TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors, pytorch_model.bin"):
        resolve_teacher_weights(tmp_path / "empty", DINOV3, **TINY)


def test_unreadable_files(tmp_path):
    for name in ("bad.safetensors", "bad.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint" * 8)
        with pytest.raises(ValueError, match=f"{name} is not a readable"):
            read_state_dict(tmp_path / name)
    with pytest.raises(ValueError, match="unknown teacher weights type '.npz'"):
        read_state_dict(tmp_path / "weights.npz")
    # A pickled object beyond tensors is never unpickled (weights_only=True refuses it).
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"argparse.Namespace\), so it is not read.*state_dict"):
        read_state_dict(tmp_path / "ckpt.pth")
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 3}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        read_state_dict(tmp_path / "opt.pth")


def test_training_checkpoint_unwrapped(tmp_path):
    state = {"module.w": torch.ones(2)}
    torch.save({"state_dict": state, "step": 7}, tmp_path / "ddp.pth")
    assert read_state_dict(tmp_path / "ddp.pth").keys() == {"w"}  # DDP's prefix dropped too


def test_wrong_weights_refused(tmp_path, dinov2_native):
    with pytest.raises(ValueError, match="not a DINOv2/DINOv3 checkpoint"):
        convert_state_dict({"fc.weight": torch.zeros(2, 2)}, DINOV3, **TINY)
    _, v2_path = dinov2_native
    with pytest.raises(ValueError, match="holds DINOv2, timm layout weights.*--tok.teacher dinov2"):
        resolve_teacher_weights(v2_path, DINOV3, **TINY)
    wide = tmp_path / "wide.safetensors"
    save_file(_state(_tiny(DINOV3, embed_dim=96, depth=2, num_heads=2, num_classes=0)), str(wide))
    with pytest.raises(
        ValueError, match="does not hold weights of vit_small_patch16_dinov3.*shape mismatches"
    ):
        resolve_teacher_weights(wide, DINOV3, **TINY)
    # timm would resample a patch embedding of another size: a different teacher, so refused.
    patch8 = tmp_path / "patch8.safetensors"
    save_file(_state(_tiny(DINOV3, patch_size=8, **TINY)), str(patch8))
    with pytest.raises(ValueError, match=r"patch size is \(8, 8\), not \(16, 16\)"):
        resolve_teacher_weights(patch8, DINOV3, **TINY)
