"""Tokenizer losses (rectok/training/losses.py, rectok/models/discriminator.py).

Proves: KL, semantic, hinge and generator terms against independent formulas; the
total is the weighted sum of its named terms in float32; the discriminator gets no
gradient from the generator loss and the generator none from the D loss; the PatchGAN
has the taming/release layout; the perceptual loss is (LPIPS + 0.1 ConvNeXt-MSE) / 1.1
and loads weights only from local files (torchvision ConvNeXt layout converted exactly,
VGG16 trunk placed into LPIPS), failing with FileNotFoundError otherwise.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rectok.models.discriminator import PatchDiscriminator
from rectok.training import losses
from rectok.training.losses import (
    DiscriminatorLoss,
    LossWeights,
    PerceptualLoss,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    semantic_loss,
    tokenizer_loss,
)


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PerceptualLoss(weights="random", resize=32)


class _Posterior:
    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp()),
        torch.distributions.Normal(torch.zeros(()).double(), torch.ones(()).double()),
    )
    expected = ref.sum(dim=(1, 2)).mean()  # sum over tokens and channels, mean over batch
    torch.testing.assert_close(kl_loss(mean, logvar).double(), expected, rtol=1e-5, atol=1e-6)
    # logvar is clamped to [-30, 20] like the posterior: a huge value equals the clamped one
    big = logvar.clone()
    big[0, 0, 0] = 80.0
    clamped = big.clamp(-30, 20)
    assert kl_loss(mean, big) == kl_loss(mean, clamped)


def test_semantic_loss_is_mean_one_minus_cosine_and_only_trains_pred():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    loss = semantic_loss(pred, target)
    ref = (1 - F.cosine_similarity(pred.detach(), target.detach(), dim=-1)).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None  # the teacher's features are a fixed target


def test_hinge_and_generator_terms_by_hand():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # real: relu(1 - [2, .5]) = [0, .5] -> .25 ; fake: relu(1 + [-2, .5]) = [0, 1.5] -> .75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_adv_loss(fake).item() == pytest.approx(0.75)
    assert hinge_d_loss(real.bfloat16(), fake.bfloat16()).dtype == torch.float32


def test_patch_discriminator_layout_and_shapes():
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]  # three strided layers
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    assert all(m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU))
    # conv weights + biases of conv1/conv5, BatchNorm affine params (taming's 2.77M)
    expected = (
        (3 * 64 * 16 + 64)
        + 64 * 128 * 16
        + 256
        + 128 * 256 * 16
        + 512
        + 256 * 512 * 16
        + 1024
        + (512 * 16 + 1)
    )
    assert sum(p.numel() for p in d.parameters()) == expected
    assert d(torch.rand(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert d(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_discriminator_loss_trains_only_d():
    torch.manual_seed(0)
    dl = DiscriminatorLoss(PatchDiscriminator(ndf=8))
    x = torch.rand(2, 3, 64, 64)
    x_hat = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = dl(x, x_hat)
    out["d_loss"].backward()
    assert x_hat.grad is None
    assert all(p.grad is not None for p in dl.parameters())
    assert set(out) == {"d_loss", "logits_real", "logits_fake"}


def test_tokenizer_loss_is_weighted_sum_and_spares_the_discriminator():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=8)
    x = torch.rand(2, 3, 64, 64)
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    post = _Posterior(torch.randn(2, 16, 4, requires_grad=True), torch.randn(2, 16, 4))
    sem_pred, sem_tgt = torch.randn(2, 16, 8, requires_grad=True), torch.randn(2, 16, 8)
    w = LossWeights(mse=1.0, perceptual=0.0, kl=1e-2, semantic=0.7, gan=0.5)
    out = tokenizer_loss(
        x,
        x_hat.bfloat16(),
        w,
        posterior=post,
        semantic_pred=sem_pred,
        semantic_target=sem_tgt,
        discriminator=disc,
    )
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())
    expected = out["mse"] + 1e-2 * out["kl"] + 0.7 * out["semantic"] + 0.5 * out["gan_g"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["kl"], kl_loss(post.mean, post.logvar))
    assert out["perceptual"] == 0  # weight 0: not computed
    out["loss"].backward()
    assert x_hat.grad is not None and post.mean.grad is not None and sem_pred.grad is not None
    assert all(p.grad is None for p in disc.parameters())  # critic only
    assert all(p.requires_grad for p in disc.parameters())  # flags restored


def test_tokenizer_loss_errors():
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="PerceptualLoss"):
        tokenizer_loss(x, x, LossWeights(perceptual=1.0))
    with pytest.raises(ValueError, match="differ"):
        tokenizer_loss(x, x[:, :, :16], LossWeights(perceptual=0.0))
    with pytest.raises(ValueError, match="loss weight kl"):
        LossWeights(kl=-1.0)


def test_perceptual_loss_combination_and_gradients(perceptual):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1).requires_grad_()
    loss = perceptual(x_hat, x)
    with torch.no_grad():
        lp = perceptual.lpips(x_hat * 2 - 1, x * 2 - 1).mean()
        size = (32, 32)
        norm = lambda t: (
            (F.interpolate(t, size=size, mode="bilinear", antialias=True) - perceptual.mean) / perceptual.std
        )
        cn = F.mse_loss(perceptual.convnext(norm(x_hat)), perceptual.convnext(norm(x)))
    torch.testing.assert_close(loss.detach(), (1.0 * lp + 0.1 * cn) / 1.1)
    assert loss > 0
    assert perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.training and not perceptual.convnext.training  # frozen nets stay in eval


def test_perceptual_speed_options_keep_the_loss(perceptual):
    """channels_last is the same math (float rounding apart); bf16 nets stay within bf16 error;
    both give gradients; a bad precision is refused."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    reference = perceptual(x_hat, x)
    for precision, channels_last, rel in (("fp32", True, 1e-4), ("bf16", False, 5e-2), ("bf16", True, 5e-2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = PerceptualLoss(
                weights="random", resize=32, precision=precision, channels_last=channels_last
            )
        fast.load_state_dict(perceptual.state_dict())
        if channels_last:
            assert fast.convnext.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        grad_in = x_hat.clone().requires_grad_()
        loss = fast(grad_in, x)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference.item(), rel=rel), (precision, channels_last)
        loss.backward()
        assert grad_in.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        PerceptualLoss(weights="random", precision="fp16")


def test_random_weights_warn_loudly():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        PerceptualLoss(weights="random", lpips_weight=0.0, convnext_weight=0.1, resize=32)


def test_missing_weights_raise_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("RECTOK_WEIGHTS_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="convnext_small-0c510722.pth") as err:
        PerceptualLoss(weights="pretrained", weights_dir=tmp_path, lpips_weight=0.0)
    assert str(tmp_path) in str(err.value) and "download.pytorch.org" in str(err.value)
    with pytest.raises(ValueError, match="perceptual weights"):
        PerceptualLoss(weights="imagenet")


def test_convnext_torchvision_weights_convert_exactly(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import timm

    torch.manual_seed(0)
    tv = torchvision.models.convnext_tiny(weights=None).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(0.02 * torch.randn_like(p))  # non-trivial layer scales and norms
    converted = losses.convnext_torchvision_to_timm(tv.state_dict())
    tm = timm.create_model("convnext_tiny", pretrained=False).eval()
    tm.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tm(x), tv(x), rtol=1e-5, atol=1e-5)


def test_lpips_trunk_loaded_from_local_vgg_file(tmp_path, perceptual):
    # A torchvision-layout VGG16 "features.*" file made from a known trunk.
    torch.manual_seed(0)
    trunk = perceptual.lpips.net.state_dict()
    fake = {f"features.{k.split('.', 1)[1]}": torch.randn_like(v) for k, v in trunk.items()}
    torch.save(fake, tmp_path / losses.VGG16_FILE)
    model = losses.build_lpips_vgg("pretrained", tmp_path)
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, fake[f"features.{name.split('.', 1)[1]}"]), name
    assert not any(p.requires_grad for p in model.parameters())
