"""The DiT^DH model: sizes, initialisation, label dropout, and that every execution path agrees.

Proves:
- the presets have the SPEC's parameter counts (~835M for -XL, ~193M for -S), counted on
  the meta device without allocating weights;
- initialize_weights gives the release's init (zero adaLN and output layer, so v = 0 at
  start; Xavier 1x1 embeddings; N(0, 0.02) label table and t-MLP; fixed sin-cos table);
- label dropout happens only in training mode and can be switched off;
- the adaLN RMSNorm (kernels.rms_norm_modulate) has the official numerics in float32;
- kernels on (Triton, interpreted on CPU) vs off, torch.compile vs eager, and bf16
  autocast vs float32 give the same velocity within each path's tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from rectok import kernels
from rectok.models.dit import DiTDH, DiTDHConfig, LatentNormalizer, dit_config, sincos_pos_embed_2d

# A CPU-cheap member used where the Triton interpreter or the compiler is slow.
SMALL = DiTDHConfig(
    in_channels=16, grid_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 3), num_classes=10
)


def _randomized(config: DiTDHConfig, seed: int = 0) -> DiTDH:
    """A model whose zero-initialised layers are filled too, so every path carries signal."""
    torch.manual_seed(seed)
    model = DiTDH(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm_final" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 2 and "y_embedder" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0, 0.1)
    return model


def _inputs(config: DiTDHConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.grid_size, config.grid_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g)
    return x, t, y


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name, expected", [("dit-dh-xl", 835.0e6), ("dit-dh-s", 193.5e6)])
def test_parameter_counts_on_meta(name, expected):
    with torch.device("meta"):
        model = DiTDH(dit_config(name))
    count = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert abs(count - expected) / expected < 0.002, f"{name}: {count / 1e6:.2f}M parameters"


def test_preset_sizes():
    xl = dit_config("dit-dh-xl")
    assert (xl.in_channels, xl.grid_size, xl.num_classes) == (128, 16, 1000)
    assert (xl.mlp_hidden(1152), xl.mlp_hidden(2048)) == (3072, 5461)
    with pytest.raises(ValueError, match="unknown DiT"):
        dit_config("dit-dh-h")
    with pytest.raises(ValueError, match="multiple of 4"):
        DiTDHConfig(hidden_size=(1152, 2048), num_heads=(16, 15))


def test_initialization():
    model = DiTDH(dit_config("dit-dh-tiny"))
    for block in [*model.trunk_blocks, *model.head_blocks, model.final_layer]:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    assert not model.final_layer.linear.weight.any()
    for embed in (model.s_embedder, model.x_embedder):
        fan_out, fan_in = embed.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert embed.weight.abs().max() <= bound and embed.weight.abs().max() > 0.9 * bound
        assert not embed.bias.any()
    for w in (model.y_embedder.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(128, 8))
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        assert not model(x, t, y).any()  # zero output layer: v = 0 at initialisation


def test_label_dropout_only_in_training():
    model = _randomized(dit_config("dit-dh-tiny", label_dropout=1.0))
    x, t, y = _inputs(model.config)
    y = y.clamp(max=model.num_classes - 1)
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        v_eval, v_null = model(x, t, y), model(x, t, null)
        model.train()
        assert torch.equal(model(x, t, y), v_null)  # every label dropped
        model.label_dropout = 0.0
        assert torch.equal(model(x, t, y), v_eval)  # switched off
    assert not torch.equal(v_eval, v_null)


def test_forward_rejects_wrong_latent_shape():
    model = DiTDH(SMALL)
    with pytest.raises(ValueError, match=r"\[B, 16, 4, 4\]"):
        model(torch.zeros(1, 16, 4, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_rms_norm_modulate_has_official_numerics():
    """The release: `x * rsqrt(mean(x^2) + eps)` in float32, cast back, times the weight; then modulate."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 72, generator=g) * 3
    w, shift, scale = (torch.randn(s, generator=g) for s in ((72,), (2, 1, 72), (2, 1, 72)))
    xf = x.float()
    official = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w
    official = official * (1 + scale) + shift
    with kernels.use_backend("torch"):
        assert torch.equal(kernels.rms_norm_modulate(x, w, shift, scale, 1e-6), official)


def test_kernels_on_matches_off():
    """Triton kernels (interpreted on CPU) against the PyTorch references on dit-dh-tiny."""
    model = _randomized(dit_config("dit-dh-tiny"))
    x, t, y = _inputs(model.config)
    with torch.no_grad():
        with kernels.use_backend("torch"):
            ref = model(x, t, y)
        with kernels.use_backend("triton"):
            out = model(x, t, y)
    assert _rel_err(out, ref) < 1e-5


def test_torch_compile_matches_eager():
    """fullgraph=True: no graph breaks anywhere in the forward (reference kernels)."""
    torch._dynamo.reset()
    model = _randomized(SMALL)
    x, t, y = _inputs(SMALL)
    with torch.no_grad(), kernels.use_backend("torch"):
        ref = model(x, t, y)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    assert _rel_err(out, ref) < 1e-6


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = _randomized(SMALL)
    x, t, y = _inputs(SMALL)
    with torch.no_grad(), kernels.use_backend("torch"):
        ref = model(x, t, y)
        out = torch.compile(model, fullgraph=True)(x, t, y)
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("mode, tol", [("autocast", 2e-2), ("cast", 3e-2)])
def test_bf16_close_to_fp32(mode, tol):
    """bf16 autocast (the training setting) or a model cast to bf16 stays within bf16 error of fp32
    (measured ~0.9% / ~1.0% of max|v| on this model)."""
    model = _randomized(dit_config("dit-dh-tiny"))
    x, t, y = _inputs(model.config)
    with torch.no_grad(), kernels.use_backend("torch"):
        ref = model(x, t, y)
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, t, y)
        else:
            out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    err = _rel_err(out, ref)
    assert err < tol, f"bf16 ({mode}) relative error {err:.3e}"


def test_latent_normalizer_round_trip():
    mean, std = torch.randn(16), torch.rand(16) + 0.5
    norm = LatentNormalizer(mean, std)
    z = torch.randn(2, 16, 4, 4) * std[:, None, None] + mean[:, None, None]
    zn = norm.normalize(z)
    assert torch.allclose(zn.mean((0, 2, 3)), (z.mean((0, 2, 3)) - mean) / std, atol=1e-5)
    assert torch.allclose(norm.denormalize(zn), z, atol=1e-5)
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError, match="positive"):
        LatentNormalizer(mean, -std)
    with pytest.raises(ValueError, match=r"\[B, 16"):
        norm.normalize(torch.zeros(2, 8, 4, 4))
