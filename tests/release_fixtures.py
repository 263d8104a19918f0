"""Shared pieces of the release-parity tests (tests/test_release_*.py) and of the scripts that made
their fixtures (tests/fixtures/release/make_*.py).

Big frozen networks (VGG16, ConvNeXt-S, the PatchGAN) are not stored in the fixtures: both sides
rebuild the same weights from a seed with `deterministic_state`, which uses numpy's PCG64 (whose
stream numpy keeps stable across versions) keyed by the parameter name, so the values depend
neither on torch's RNG nor on the order in which a module lists its parameters.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(os.environ.get("RECTOK_RELEASE_FIXTURES", Path(__file__).parent / "fixtures" / "release"))


def fixture_path(name: str) -> Path:
    """Path of a release fixture file; skips the test with the regeneration hint if it is missing."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"release fixture {path} is missing (see {FIXTURES / 'README.md'} to regenerate it)")
    return path


def _values(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n = rng.standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return 1.0 + 0.1 * np.abs(n)
    if leaf in ("running_mean", "bias"):
        return 0.05 * n
    if "layer_scale" in name or leaf == "gamma":  # ConvNeXt layer scale: keep blocks near identity
        return 0.1 + 0.02 * n
    if len(shape) <= 1:  # norm weights
        return 1.0 + 0.1 * n
    fan_in = math.prod(shape[1:])
    return n / math.sqrt(fan_in)


def deterministic_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A float32 state dict for `module` (same keys and shapes) filled from `seed`; integer buffers
    (BatchNorm's num_batches_tracked) are zero."""
    out = {}
    for name, t in module.state_dict().items():
        if t.is_floating_point():
            out[name] = torch.from_numpy(_values(name, tuple(t.shape), seed).astype(np.float32))
        else:
            out[name] = torch.zeros_like(t)
    return out


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max(max |ref|, 1e-12), in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# Seeds of the frozen networks both sides rebuild (tests/fixtures/release/README.md).
SEED_VGG, SEED_CONVNEXT, SEED_LPIPS_HEADS, SEED_DISC, SEED_DINOV2 = 11, 12, 13, 14, 21


def write_perceptual_weights(folder: Path) -> None:
    """The release's `offline_models/` files (torchvision VGG16 `vgg16.pth`, torchvision ConvNeXt-S,
    LPIPS heads `lpips/vgg.pth`) filled with deterministic weights."""
    import lpips
    import torchvision

    (folder / "lpips").mkdir(parents=True, exist_ok=True)
    torch.save(deterministic_state(torchvision.models.vgg16(), SEED_VGG), folder / "vgg16.pth")
    torch.save(
        deterministic_state(torchvision.models.convnext_small(), SEED_CONVNEXT),
        folder / "convnext_small-0c510722.pth",
    )
    heads = torch.nn.ModuleDict(
        {f"lin{i}": lpips.NetLinLayer(c, use_dropout=True) for i, c in enumerate([64, 128, 256, 512, 512])}
    )
    torch.save(deterministic_state(heads, SEED_LPIPS_HEADS), folder / "lpips" / "vgg.pth")
