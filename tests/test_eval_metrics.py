"""PSNR / SSIM match scikit-image, and tokenizer reconstruction evaluation computes them per image.

Proves: rectok.eval.image_metrics.psnr equals skimage.metrics.peak_signal_noise_ratio and
ssim equals skimage.metrics.structural_similarity with the Wang et al. settings
(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, per channel)
to float64 precision; the uint8 quantisation modes; and that evaluate_reconstruction decodes
the posterior mean (first C of 2C channels), clamps to [0, 1], averages per-image metrics
independently of the batch size, and writes its JSON and PNG grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rectok.eval.image_metrics import psnr, ssim
from rectok.eval.reconstruction import evaluate_reconstruction
from rectok.sampling.images import to_uint8


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """a, b [H, W, C] float64 in [0, 1]."""
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2
    )


def _image_pairs(seed: int, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural-image crops and degraded copies [B, C, H, W] in [0, 1] (noise + blur + clipping)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    photo = torch.from_numpy(skdata.astronaut().astype(np.float64) / 255.0).permute(2, 0, 1)  # (3, 512, 512)
    xs = []
    for _ in range(b):
        top, left = torch.randint(0, 512 - h, (2,), generator=g).tolist()
        xs.append(photo[:c, top : top + h, left : left + w])
    x = torch.stack(xs)
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    y = (0.7 * x + 0.3 * blur + 0.08 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 48, 40), (2, 1, 11, 11), (1, 3, 64, 64)])
def test_psnr_ssim_match_skimage(shape):
    x, y = _image_pairs(0, shape)
    ours_psnr, ours_ssim = psnr(x, y), ssim(x, y)
    for i in range(shape[0]):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        ref_psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        assert abs(ours_psnr[i].item() - ref_psnr) < 1e-9
        assert abs(ours_ssim[i].item() - _skimage_ssim(a, b)) < 1e-9
    # float32 inputs give the same numbers: metrics are computed in float64 internally
    assert torch.allclose(ssim(x.float(), y.float()), ours_ssim, atol=1e-6)


def test_ssim_and_psnr_edge_cases():
    x, y = _image_pairs(1, (2, 3, 24, 24))
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()
    # SSIM is symmetric and drops as the degradation grows
    assert torch.allclose(ssim(x, y), ssim(y, x))
    worse = (y + 0.2 * torch.randn_like(y)).clamp(0, 1)
    assert (ssim(x, worse) < ssim(x, y)).all()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10, :10], y[..., :10, :10])
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, y[:1])


def test_to_uint8_rounding_modes():
    x = (
        torch.tensor([0.0, 0.5 / 255, 0.999 / 255, 1.6 / 255, 1.0, 1.2, -0.1])
        .view(1, 1, 1, 7)
        .expand(1, 3, 1, 7)
    )
    floor = to_uint8(x, "floor")[0, 0, :, 0].tolist()
    rnd = to_uint8(x, "round")[0, 0, :, 0].tolist()
    assert floor == [0, 0, 0, 1, 255, 255, 0]
    assert rnd == [0, 0, 1, 2, 255, 255, 0]
    assert to_uint8(x).shape == (1, 1, 7, 3) and to_uint8(x).dtype == torch.uint8
    with pytest.raises(ValueError):
        to_uint8(x, "nearest")


class PatchTokenizer(torch.nn.Module):
    """Stand-in with the RecTok interface: encoder(x) -> moments [B, L, 2C] (mean | logvar),
    pixel_decoder(z) -> [B, 3, H, W] in [-1, 1] space, reconstruct(x) -> [0, 1]. Decoding scales and
    shifts the image so the reconstruction is imperfect, and a wrong half of the moments would be
    obvious."""

    def __init__(self, patch: int = 8) -> None:
        super().__init__()
        self.p = patch
        self.encoder = self._encode
        self.pixel_decoder = self._decode

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        self.hw = x.shape[-2:]
        tokens = torch.nn.functional.unfold(x, self.p, stride=self.p).transpose(1, 2)  # (B, L, 3*p*p)
        return torch.cat([tokens, torch.full_like(tokens, 3.0)], dim=-1)  # logvar half is not an image

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        img = torch.nn.functional.fold(z.transpose(1, 2), self.hw, self.p, stride=self.p)
        return 1.15 * img - 0.05

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """As RecTok.reconstruct: the posterior mean (first half of the moments), decoded to [0, 1]."""
        moments = self._encode(x)
        return (self._decode(moments[..., : moments.shape[-1] // 2]) * 0.5 + 0.5).clamp(0, 1)


def _loader(images: torch.Tensor, batch_size: int):
    return [
        (images[i : i + batch_size], torch.zeros(len(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]


def test_reconstruction_psnr_ssim_per_image(tmp_path):
    tok = PatchTokenizer()
    x01, _ = _image_pairs(2, (7, 3, 32, 32))
    images = (x01 * 2 - 1).float()  # loader convention: [-1, 1]
    expected_rec = torch.clamp((1.15 * images - 0.05) * 0.5 + 0.5, 0, 1)
    assert torch.allclose(tok.reconstruct(images), expected_rec)

    ref_psnr, ref_ssim = [], []
    for i in range(7):
        a = (images[i] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).double().numpy()
        b = expected_rec[i].permute(1, 2, 0).double().numpy()
        ref_psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))
        ref_ssim.append(_skimage_ssim(a, b))

    results = [
        evaluate_reconstruction(tok, _loader(images, bs), progress=False, out_dir=tmp_path / f"bs{bs}")
        for bs in (2, 7)
    ]
    for r in results:
        assert r["num_images"] == 7
        assert abs(r["metrics"]["PSNR"] - np.mean(ref_psnr)) < 1e-4
        assert abs(r["metrics"]["SSIM"] - np.mean(ref_ssim)) < 1e-5
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"], rel=1e-9)

    limited = evaluate_reconstruction(tok, _loader(images, 3), max_images=4, progress=False)
    assert limited["num_images"] == 4
    assert abs(limited["metrics"]["PSNR"] - np.mean(ref_psnr[:4])) < 1e-4

    saved = json.loads((tmp_path / "bs2" / "reconstruction.json").read_text())
    assert saved["metrics"]["PSNR"] == pytest.approx(results[0]["metrics"]["PSNR"])
    grid = np.asarray(Image.open(tmp_path / "bs2" / "reconstruction_grid.png"))
    assert grid.shape == (2 * 32 + 3 * 2, 7 * (32 + 2) + 2, 3)  # 7 < num_grid=8 images: all of them
    # top-left cell is the first original, the cell below it its reconstruction
    top = grid[2:34, 2:34].astype(int)
    bottom = grid[36:68, 2:34].astype(int)
    assert np.abs(top - to_uint8(x01[:1].float(), "round")[0].numpy()).max() <= 1
    assert np.abs(bottom - to_uint8(expected_rec[:1], "round")[0].numpy()).max() <= 1


def test_reconstruction_rejects_empty_loader():
    with pytest.raises(ValueError, match="no images"):
        evaluate_reconstruction(PatchTokenizer(), [], progress=False)


def test_recon_cli_on_tiny_official_checkpoint(tmp_path):
    from rectok.checkpoints.official import save_official
    from rectok.eval.cli import main
    from rectok.models.tokenizer import RecTok, tokenizer_config

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_official(RecTok(tokenizer_config("rectok-tiny")), ckpt)
    (tmp_path / "val" / "n01").mkdir(parents=True)
    photo = skdata.astronaut()
    for i in range(3):
        Image.fromarray(photo[40 * i : 40 * i + 300, 60 * i : 60 * i + 200]).save(
            tmp_path / "val" / "n01" / f"{i}.png"
        )
    out = tmp_path / "recon"
    main([
        "recon", "--checkpoint", str(ckpt), "--data", str(tmp_path / "val"), "--no-fid", "--device", "cpu",
        "--num-workers", "0", "--batch-size", "2", "--out", str(out), "--meta", "ema=raw", "--no-progress",
    ])  # fmt: skip
    saved = json.loads((out / "reconstruction.json").read_text())
    assert saved["num_images"] == 3 and set(saved["metrics"]) == {"PSNR", "SSIM"}
    assert saved["meta"]["image_size"] == 64 and saved["meta"]["ema"] == "raw"
    assert saved["meta"]["checkpoint"] == str(ckpt)

    # the numbers are those of the tokenizer on the ADM center crops, computed directly
    from rectok.checkpoints.official import load_official_tokenizer
    from rectok.eval.image_io import LabelledImageFolder

    tok = load_official_tokenizer(ckpt).eval()
    x = torch.stack([LabelledImageFolder(tmp_path / "val", 64)[i][0] for i in range(3)])
    rec = tok.decode(tok.encode(x).mean)  # RecTok's own [0, 1] reconstruction of the posterior mean
    assert saved["metrics"]["PSNR"] == pytest.approx(psnr(x * 0.5 + 0.5, rec).mean().item(), rel=1e-5)
    assert saved["metrics"]["SSIM"] == pytest.approx(ssim(x * 0.5 + 0.5, rec).mean().item(), rel=1e-5)
    assert Image.open(out / "reconstruction_grid.png").size == (3 * 66 + 2, 2 * 64 + 6)
