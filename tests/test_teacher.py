"""Teacher: what this file proves.

- Features are the patch tokens after the final norm with the class and register tokens
  dropped: [B, grid^2, D], for a tiny DINOv3-style ViT (real compute) and for the full
  DINOv3 ViT-L/16 and DINOv2 ViT-L/14 architectures (on the meta device: no memory, no weights).
- Preprocessing equals an independent reference (PIL's antialiased bilinear resize to 224,
  ImageNet normalisation, a hand-written bilinear upsampling back to the image size).
- The teacher is frozen: eval mode even after .train() on it or a parent, no parameter needs
  grad, outputs carry no graph.
- Weights: missing -> FileNotFoundError that says how to get them; "random" warns; a local
  .safetensors / .pth round-trips exactly; a wrong file is refused; an HF hub cache already on
  disk is found without network access; a DINOv2 checkpoint at its native 518 px loads into
  the 16 x 16 grid exactly as the release's dynamic-size model sees it.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn

from rectok.models.teacher import Teacher
from rectok.models.teacher_weights import TEACHERS


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1


def test_tiny_features_drop_prefix_tokens(images):
    teacher = Teacher.tiny()
    assert teacher.is_random and teacher.num_prefix_tokens == 5  # class token + 4 registers
    feats = teacher(images)
    assert feats.shape == (2, 16, 64) and feats.dtype == torch.float32
    tokens = teacher.model.forward_features(teacher.preprocess(images))  # after the final norm
    assert tokens.shape == (2, 5 + 16, 64)
    torch.testing.assert_close(feats, tokens[:, 5:], rtol=0, atol=0)
    # The final norm is applied: LayerNorm output has ~zero mean per token before its affine
    # part, and the tiny model's norm is still at its identity init.
    torch.testing.assert_close(feats.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="64px"):
        teacher(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    "name, prefix, feed",
    [("dinov3", 5, 256), ("dinov2", 1, 224)],
)
def test_full_architectures_on_meta(name, prefix, feed):
    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = Teacher(name, "random", device="meta")
    assert teacher.model_name == TEACHERS[name]
    assert teacher.num_prefix_tokens == prefix and teacher.feed_size == feed and teacher.feature_dim == 1024
    x = torch.zeros(2, 3, 256, 256, device="meta")
    assert teacher.preprocess(x).shape == (2, 3, feed, feed)
    assert teacher(x).shape == (2, 256, 1024)  # one feature per 16 px latent token


def test_frozen_even_after_train(images):
    teacher = Teacher.tiny()
    parent = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(4, 4)})
    parent.train()
    assert parent["head"].training
    # .train() reaches the teacher (as the release's model.train(True) does) but only switches the
    # RoPE rescale: every timm module stays in eval mode and nothing needs grad.
    assert teacher.training and not any(m.training for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = images.clone().requires_grad_(True)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None


def _bilinear_upsample_reference(x: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear interpolation (align_corners=False), [C, H, W] -> [C, size, size]."""
    c, h, w = x.shape

    def taps(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_preprocess_matches_reference():
    teacher = Teacher.tiny(image_size=256, targets="clean")  # the 256 -> 224 -> 256 round trip
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    ours = teacher.preprocess(x)[0].numpy()

    img01 = ((x[0] + 1) / 2).numpy()
    # PIL's BILINEAR downscale is the antialiased triangle filter torch's antialias=True follows.
    small = np.stack(
        [np.asarray(Image.fromarray(ch, mode="F").resize((224, 224), Image.BILINEAR)) for ch in img01]
    )
    normed = (small - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    ref = _bilinear_upsample_reference(normed, 256)
    assert ours.shape == ref.shape == (3, 256, 256)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def test_missing_weights_message(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    with pytest.raises(FileNotFoundError) as info:
        Teacher("dinov3", None, cache_dir=tmp_path / "empty_hub")
    msg = str(info.value)
    for needle in (
        "--tok.teacher_weights",
        "huggingface-cli download timm/vit_large_patch16_dinov3.lvd1689m",
        "dinov2",
    ):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="not found"):
        Teacher("dinov3", tmp_path / "nope.safetensors")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_weights_round_trip(tmp_path, images, fmt, no_network):
    source = Teacher.tiny()
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)  # a training-checkpoint wrapper, read with weights_only=True
    loaded = Teacher.tiny(weights=path)
    assert not loaded.is_random and loaded.weights_source == str(path)
    torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)
    assert not Teacher.tiny()(images).allclose(source(images))  # a fresh random teacher differs


def test_wrong_weights_refused(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in Teacher.tiny(dim=96).model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="does not hold weights"):
        Teacher.tiny(weights=path)


def test_hub_cache_found_offline(tmp_path, images, no_network):
    """A timm hub repo already in the HF cache is used without any download."""
    source = Teacher.tiny()
    snapshot = tmp_path / "hub" / "models--timm--vit_small_patch16_dinov3.lvd1689m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in source.model.state_dict().items()}, str(snapshot / "model.safetensors")
    )
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    teacher = Teacher(
        "vit_small_patch16_dinov3.lvd1689m",
        None,
        image_size=64,
        model_kwargs=dict(embed_dim=64, depth=2, num_heads=2),
        cache_dir=tmp_path / "hub",
    )
    assert teacher.weights_source.endswith("model.safetensors") and not teacher.is_random
    torch.testing.assert_close(teacher(images), source(images), rtol=0, atol=0)


def test_dinov2_checkpoint_position_embedding_resampled(tmp_path, no_network):
    """A DINOv2-family checkpoint saved at timm's native 518 px (37 x 37 positions) loads into the
    teacher's (S / 16) * 14 px grid; the result equals the release's dynamic-size DINOv2, which
    interpolates the position embedding at run time."""
    kwargs = dict(embed_dim=64, depth=2, num_heads=2)
    native = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **kwargs)
    assert native.pos_embed.shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_small.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    teacher = Teacher("vit_small_patch14_dinov2.lvd142m", path, image_size=64, model_kwargs=kwargs)
    assert teacher.feed_size == 56 and teacher.num_prefix_tokens == 1
    dynamic = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
    )
    dynamic.load_state_dict(native.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = dynamic.forward_features(teacher.preprocess(x))[:, 1:]
    assert teacher(x).shape == (2, 16, 64)
    torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_tiny_teacher_on_cuda_matches_cpu(images):
    teacher = Teacher.tiny()
    expected = teacher(images)
    teacher.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = teacher(images.cuda())
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=0.1, rtol=0.05)  # bf16 compute
