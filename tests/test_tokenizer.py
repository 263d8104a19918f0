"""Proves that the RecTok tokenizer is built and behaves as SPEC section 2 says:

- sizes: rectok-B has the parameter count implied by the architecture (~172M at
  C = 128), checked on the meta device without allocating weights;
- the 2-D RoPE table (quirk included), init, config validation and presets;
- masking and forward-flow helpers: ratio distribution, len_keep, ids_restore =
  argsort(ids_shuffle), mask-token insertion, tau schedules, interpolation endpoints;
- the masked encoder is the unmasked one restricted to the kept tokens' positions
  (permutation equivariance with the per-sample RoPE gather);
- the same outputs and gradients with the Triton kernels (interpreter on CPU) and
  with the PyTorch references, under torch.compile, and under bf16 autocast.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from rectok.kernels import use_backend

from rectok.models import flow
from rectok.models.layers import mlp_hidden_dim
from rectok.models.tokenizer import (
    PRESETS,
    DiagonalGaussian,
    RecTok,
    RecTokConfig,
    insert_mask_tokens,
    tokenizer_config,
    tokenizer_rope_table,
)


@pytest.fixture(scope="module")
def tiny() -> RecTok:
    torch.manual_seed(0)
    model = RecTok(tokenizer_config("rectok-tiny")).eval()
    with torch.no_grad():  # non-trivial mask tokens and norm weights so that every path matters
        for p in model.parameters():
            if p.ndim <= 1 or p.shape[:2] == (1, 1):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------- sizes and config


def _expected_params(cfg: RecTokConfig) -> tuple[int, int, int]:
    """Parameter counts of (encoder, pixel decoder, semantic decoder) derived from SPEC section 2."""

    def blocks(d: int, depth: int) -> int:
        h = int(2 / 3 * 4 * d)
        per = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * 2 * h + 2 * h) + (h * d + d)
        return depth * per

    C, L, p = cfg.token_channels, cfg.seq_len, cfg.patch_size
    d = cfg.encoder_width
    enc = (3 * p * p * d + d) + L * d + 2 * d + blocks(d, cfg.encoder_depth) + (d * 2 * C + 2 * C)
    d = cfg.decoder_width
    dec = (C * d + d) + d + L * d + 2 * d + blocks(d, cfg.decoder_depth) + (d * p * p * 3 + p * p * 3) + 84
    w = cfg.semantic_width
    sem = (
        (C * w + w)
        + w
        + L * w
        + 2 * w
        + blocks(w, cfg.semantic_depth)
        + (w * cfg.semantic_dim + cfg.semantic_dim)
    )
    return enc, dec, sem


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("channels", [16, 128])
def test_rectok_b_parameter_count_on_meta_device(channels: int) -> None:
    with torch.device("meta"):
        model = RecTok(tokenizer_config("rectok-B", token_channels=channels))
    assert all(p.is_meta for p in model.parameters())
    enc, dec, sem = _expected_params(model.cfg)
    assert (_count(model.encoder), _count(model.pixel_decoder), _count(model.semantic_decoder)) == (
        enc,
        dec,
        sem,
    )
    assert mlp_hidden_dim(768) == 2048
    if channels == 128:
        # SPEC: ~172M for encoder + pixel decoder, ~1.6M for the semantic head.
        assert abs((enc + dec) / 1e6 - 172) < 1.0, (enc + dec) / 1e6
        assert abs(sem / 1e6 - 1.6) < 0.05, sem / 1e6


def test_presets_and_overrides() -> None:
    b = PRESETS["rectok-B"]
    assert (b.img_size, b.patch_size, b.token_channels, b.seq_len) == (256, 16, 128, 256)
    assert (b.encoder_width, b.encoder_depth, b.encoder_heads) == (768, 12, 12)
    assert (b.semantic_width, b.semantic_depth, b.semantic_heads, b.semantic_dim) == (192, 3, 4, 1024)
    assert b.shift == pytest.approx(math.sqrt(8.0))
    assert tokenizer_config("rectok-B", token_channels=16).shift == pytest.approx(1.0)
    assert tokenizer_config("rectok-tiny").shift == pytest.approx(0.25)
    assert tokenizer_config("rectok-B", timestep_shift=3.0).shift == 3.0
    assert RecTokConfig.from_dict(b.to_dict()) == b


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(img_size=250), "not a multiple of patch_size"),
        (dict(encoder_heads=5), "head dim divisible by 4"),
        (dict(token_channels=0), "token_channels must be positive"),
        (dict(noise_schedule="cosine"), "unknown noise_schedule"),
        (dict(mask_ratio_max=1.0), "mask_ratio_max"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokenizer_config("rectok-B", **overrides)


def test_unknown_preset_and_field() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        tokenizer_config("rectok-Z")
    with pytest.raises(ValueError, match="unknown RecTokConfig fields"):
        RecTokConfig.from_dict({"width": 3})


def test_initialisation() -> None:
    torch.manual_seed(0)
    model = RecTok(tokenizer_config("rectok-B", encoder_depth=1, decoder_depth=1))
    qkv = model.encoder.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.count_nonzero(qkv.bias) == 0 and torch.count_nonzero(model.pixel_decoder.conv_out.bias) == 0
    assert model.encoder.pos_embed.std().item() == pytest.approx(768**-0.5, rel=0.02)
    assert model.pixel_decoder.mask_token.abs().sum() > 0
    sem = model.semantic_decoder
    assert torch.count_nonzero(sem.mask_token) == 0
    # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases included.
    bound = 1 / math.sqrt(192)
    assert sem.blocks[0].attn.qkv.weight.abs().max() <= bound and sem.blocks[0].attn.qkv.bias.abs().max() > 0
    assert sem.blocks[0].attn.qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(
        torch.equal(n.weight, torch.ones(768)) for n in (model.encoder.norm_pre, model.encoder.norm_post)
    )


# ---------------------------------------------------------------- RoPE


def test_rope_table_layout_and_quirk() -> None:
    grid, D = 4, 48
    table = tokenizer_rope_table(grid, D)
    assert table.shape == (grid * grid, 2 * D)
    cos, sin = table[:, :D].double(), table[:, D:].double()
    f = 7.0 * (1e4 ** torch.linspace(0, -1, D // 4, dtype=torch.float64))
    f2 = torch.cat([f, f]) * 2 * math.pi
    coord = torch.linspace(0, 1, grid, dtype=torch.float64)
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        angle = torch.cat([coord[row] * f2, coord[col] * f2])
        torch.testing.assert_close(cos[token], angle.cos(), atol=2e-5, rtol=0)
        torch.testing.assert_close(sin[token], angle.sin(), atol=2e-5, rtol=0)
    # The quirk: interleaved pairs (2i, 2i+1) rotated together carry different frequencies.
    assert f2[0] != f2[1]
    with pytest.raises(ValueError, match="divisible by 4"):
        tokenizer_rope_table(grid, 30)


# ---------------------------------------------------------------- masking and flow


def test_mask_ratio_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    ratios = torch.tensor([flow.sample_mask_ratio(g) for _ in range(4000)])
    assert ratios.min() == 0.0 and ratios.max() <= 0.4 and ratios.max() > 0.39
    assert (ratios == 0).float().mean().item() == pytest.approx(0.2, abs=0.03)  # P(U(-0.1, 0.4) < 0) = 1/5
    positive = ratios[ratios > 0]
    assert positive.mean().item() == pytest.approx(0.2, abs=0.01)  # U(0, 0.4]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert flow.sample_mask_ratio(g1) == flow.sample_mask_ratio(g2)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3125, 0.39])
def test_random_masking_ids(ratio: float) -> None:
    B, L = 3, 16
    m = flow.random_masking_ids(B, L, ratio, torch.Generator().manual_seed(0))
    assert m.len_keep == math.ceil(L * (1 - ratio))
    assert torch.equal(m.ids_shuffle.sort(dim=1).values, torch.arange(L).expand(B, L))
    assert torch.equal(m.ids_restore, torch.argsort(m.ids_shuffle, dim=1))
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(L).expand(B, L))
    assert torch.equal(m.ids_keep, m.ids_shuffle[:, : m.len_keep])
    assert m.ids_keep.dtype == torch.int64


def test_random_masking_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        flow.random_masking_ids(2, 16, 1.0)


def test_insert_mask_tokens() -> None:
    B, L, W = 2, 16, 8
    m = flow.random_masking_ids(B, L, 0.3, torch.Generator().manual_seed(3))
    full = torch.randn(B, L, W)
    visible = torch.gather(full, 1, m.ids_keep[..., None].expand(-1, -1, W))
    token = torch.full((1, 1, W), 7.0)
    out = insert_mask_tokens(visible, token, m.ids_restore)
    kept = torch.zeros(B, L, dtype=torch.bool).scatter_(1, m.ids_keep, True)
    torch.testing.assert_close(out[kept], full[kept], rtol=0, atol=0)
    assert torch.all(out[~kept] == 7.0)


def test_timestep_shift_and_tau() -> None:
    assert flow.timestep_shift(16, 16, 128) == pytest.approx(2.8284271)
    assert flow.timestep_shift(16, 16, 16) == pytest.approx(1.0)
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(flow.shift_tau(u, 1.0), u)
    tau = flow.shift_tau(u, 2.83)
    assert tau[0] == 0 and tau[-1] == pytest.approx(1.0) and torch.all(tau[1:-1] > u[1:-1])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        flow.sample_tau(5, 2.83, "shift", g1), flow.shift_tau(torch.rand(5, generator=g2), 2.83)
    )
    g = torch.Generator().manual_seed(0)
    for schedule in flow.SCHEDULES:
        t = flow.sample_tau(1000, 2.83, schedule, g)
        assert t.shape == (1000,) and t.min() >= 0 and t.max() <= 1
    assert flow.sample_tau(4000, 2.83, "shift", g).mean() > 0.6  # shift > 1 favours noise
    assert flow.sample_tau(4000, 1.0, "lognorm", g).mean().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        flow.sample_tau(2, 1.0, "cosine")


def test_forward_flow() -> None:
    z, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    out = flow.forward_flow(z, eps, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(out[0], z[0])
    torch.testing.assert_close(out[1], eps[1])
    torch.testing.assert_close(out[2], 0.75 * z[2] + 0.25 * eps[2])


def test_posterior() -> None:
    moments = torch.cat([torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)], dim=-1)
    post = DiagonalGaussian(moments)
    torch.testing.assert_close(post.kl(), torch.zeros(2))
    mean, logvar = torch.randn(2, 4, 3), torch.tensor([-40.0, 0.5, 25.0]).expand(2, 4, 3)
    post = DiagonalGaussian(torch.cat([mean, logvar], -1))
    assert post.logvar[0, 0].tolist() == [-30.0, 0.5, 20.0]
    noise = torch.randn(2, 4, 3)
    torch.testing.assert_close(post.sample(noise=noise), mean + torch.exp(0.5 * post.logvar) * noise)
    expected = 0.5 * (mean**2 + post.logvar.exp() - 1 - post.logvar)
    torch.testing.assert_close(post.kl(), expected.sum((1, 2)))


# ---------------------------------------------------------------- model behaviour


def test_shapes_and_input_checks(tiny: RecTok) -> None:
    x = _images()
    with torch.no_grad():
        moments = tiny.encoder(x)
        assert moments.shape == (2, 16, 32)
        assert tiny.pixel_decoder(moments[..., :16]).shape == (2, 3, 64, 64)
        assert tiny.semantic_decoder(moments[..., :16]).shape == (2, 16, 64)
        rec = tiny.reconstruct(x)
        assert rec.min() >= 0 and rec.max() <= 1
        with pytest.raises(ValueError, match="encoder expects"):
            tiny.encoder(_images(size=32))
        with pytest.raises(ValueError, match="pixel decoder expects 16 tokens"):
            tiny.pixel_decoder(moments[:, :10, :16])


def test_masked_encoder_is_permutation_equivariant(tiny: RecTok) -> None:
    """Keeping every token in shuffled order must permute the unmasked output: each kept
    token carries its own position embedding and RoPE row wherever it lands."""
    x = _images()
    m = flow.random_masking_ids(2, 16, 0.0, torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny.encoder(x)
        shuffled = tiny.encoder(x, m.ids_keep)
    expected = torch.gather(full, 1, m.ids_keep[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(shuffled, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        restored = tiny.pixel_decoder(shuffled[..., :16], m.ids_restore)
        plain = tiny.pixel_decoder(full[..., :16])
    torch.testing.assert_close(restored, plain, atol=1e-5, rtol=1e-5)


def test_training_forward_is_reproducible_and_reaches_every_parameter(tiny: RecTok) -> None:
    tiny.train()
    try:
        seed = 2  # first ratio of this seed masks some tokens, so the mask tokens get gradients
        out = tiny(_images(), generator=torch.Generator().manual_seed(seed))
        again = tiny(_images(), generator=torch.Generator().manual_seed(seed))
    finally:
        tiny.eval()
    assert out.mask is not None and out.mask.len_keep < 16
    assert out.images.shape == (2, 3, 64, 64) and out.semantic.shape == (2, 16, 64)
    assert out.posterior.mean.shape == (2, out.mask.len_keep, 16) and out.tau.shape == (2,)
    torch.testing.assert_close(out.images, again.images, rtol=0, atol=0)
    loss = out.images.square().mean() + out.semantic.square().mean() + 1e-6 * out.posterior.kl().mean()
    loss.backward()
    no_grad = [n for n, p in tiny.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    tiny.zero_grad(set_to_none=True)
    assert no_grad == []
    eval_out = tiny(_images())
    assert eval_out.mask is None and eval_out.semantic is None and eval_out.tau is None


def _step(model: RecTok, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Masked training forward with fixed randomness; outputs and all gradients."""
    model.train()
    try:
        out = model(x, generator=torch.Generator().manual_seed(2))
        loss = (
            out.images.square().mean() + (1 - out.semantic.tanh()).mean() + out.posterior.kl().mean() * 1e-3
        )
        grads = torch.autograd.grad(loss, list(model.parameters()))
    finally:
        model.eval()
    names = [n for n, _ in model.named_parameters()]
    return [out.images, out.semantic, out.posterior.mean, loss], dict(zip(names, grads))


def test_triton_kernels_match_reference(tiny: RecTok) -> None:
    x = _images(n=1)
    with use_backend("torch"):
        ref_out, ref_grads = _step(tiny, x)
    with use_backend("triton"):
        out, grads = _step(tiny, x)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(g, ref_grads[name], atol=1e-4 * max(scale, 1e-3), rtol=1e-3, msg=name)


def test_compiled_modules_match_eager(tiny: RecTok) -> None:
    # aot_eager traces the full graph (no breaks allowed) without paying for C++ code generation
    # on small CI machines; the inductor variant below is marked slow.
    _check_compiled(tiny, backend="aot_eager")


@pytest.mark.slow
def test_compiled_modules_match_eager_inductor(tiny: RecTok) -> None:
    _check_compiled(tiny, backend="inductor")


def _check_compiled(model: RecTok, backend: str) -> None:
    torch._dynamo.reset()
    x = _images()
    m = flow.random_masking_ids(2, 16, 0.3, torch.Generator().manual_seed(0))
    with use_backend("torch"), torch.no_grad():
        enc = torch.compile(model.encoder, fullgraph=True, backend=backend)
        moments = model.encoder(x, m.ids_keep)
        torch.testing.assert_close(enc(x, m.ids_keep), moments, atol=1e-5, rtol=1e-5)
        z = moments[..., :16]
        for dec in (model.pixel_decoder, model.semantic_decoder):
            compiled = torch.compile(dec, fullgraph=True, backend=backend)
            torch.testing.assert_close(
                compiled(z, m.ids_restore), dec(z, m.ids_restore), atol=1e-5, rtol=1e-5
            )


def test_bf16_autocast_close_to_fp32(tiny: RecTok) -> None:
    x = _images()
    with torch.no_grad():
        ref_m = tiny.encoder(x)
        ref_img = tiny.pixel_decoder(ref_m[..., :16])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m = tiny.encoder(x)
            img = tiny.pixel_decoder(ref_m[..., :16])
    assert m.dtype == torch.bfloat16
    for got, ref in ((m, ref_m), (img, ref_img)):
        err = (got.float() - ref).abs().max().item()
        assert err <= 3e-2 * ref.abs().max().item(), err  # a few bf16 ulps after ~7 matmul layers
        assert err > 0  # autocast really ran in bf16


def test_channel_override_builds(tiny: RecTok) -> None:
    cfg = dataclasses.replace(tiny.cfg, token_channels=32, semantic_dim=0)
    model = RecTok(cfg)
    assert model.semantic_decoder is None
    assert model.encoder(_images()).shape == (2, 16, 64)
