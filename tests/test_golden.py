"""Golden outputs of the user-facing entry points (train.py's three stages, sample.py), recorded
by tests/fixtures/golden/record.py before the package reorganisation: the code may move, the
behaviour may not. Bounds: float32 rounding on another CPU, nothing more (losses 1e-4 relative
after a few steps, PSNR 1e-3 dB, float latents and images 1e-5 of their largest value, sample
pixels at most 2 levels and on at most 1% of them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "golden"))
import record  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[dict, dict]:
    before = torch.get_num_threads()
    try:
        now = record.compute(tmp_path_factory.mktemp("golden"))
    finally:
        torch.set_num_threads(before)
    return now, load_file(str(record.GOLDEN))


@pytest.mark.parametrize("key", ["tokenizer.history", "decoder.history", "dit.history"])
def test_training_losses_are_unchanged(outputs, key):
    now, golden = outputs
    torch.testing.assert_close(now[key], golden[key], rtol=1e-4, atol=0)


def test_heldout_psnr_is_unchanged(outputs):
    now, golden = outputs
    torch.testing.assert_close(now["tokenizer.psnr"], golden["tokenizer.psnr"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("key", ["latents_none", "latents_cfg", "reconstruction", "decoded"])
def test_float_outputs_are_unchanged(outputs, key):
    now, golden = outputs
    ref = golden[f"float.{key}"]
    torch.testing.assert_close(now[f"float.{key}"], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_samples_are_unchanged(outputs):
    now, golden = outputs
    assert torch.equal(now["sample.labels"], golden["sample.labels"])
    diff = (now["sample.images"].int() - golden["sample.images"].int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() <= 0.01, (diff.max(), (diff > 0).float().mean())
