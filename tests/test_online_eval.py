"""Online evaluation during tokenizer training (`--eval_every N` epochs).

Proves: the EMA tokenizer's PSNR / SSIM and rFID on the fixed held-out subset are logged to
metrics.jsonl at every N-th epoch and at the end, labelled as a subset rFID; the subset's Inception
statistics are computed once and kept in the run folder; the numbers equal an evaluation of the
final EMA weights by hand; without Inception weights only PSNR / SSIM are logged (one warning); the
demo has it off; training losses are the same with and without it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_script

from rectok.training.config import train_config

train = load_script("train.py")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight Inception of torch-fidelity's architecture (pretrained ones cannot be fetched)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.pth"
    torch.save(net.state_dict(), path)
    return path


def _args(data, run_dir, *extra):
    return [
        "--data.path", str(data), "--run_dir", str(run_dir), "--global_batch", "4", "--micro_batch", "4",
        "--epochs", "2", "--log_every", "1", "--image_every", "0", "--ckpt_every", "0",
        "--tensorboard", "false", "--data.eval_images", "2", "--data.num_workers", "0", *extra,
    ]  # fmt: skip


def _online_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "online/psnr" in r]


def test_online_eval_is_logged_every_epoch_and_matches_the_final_ema(demo_16, tmp_path, inception_weights):
    extra = [
        "--eval_every",
        "1",
        "--data.online_eval_images",
        "6",
        "--data.inception_weights",
        str(inception_weights),
    ]
    res = train.main(_args(demo_16, tmp_path / "on", *extra))
    steps_per_epoch = res["step"] // 2
    rows = _online_rows(tmp_path / "on")
    assert [r["step"] for r in rows] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(math.isfinite(r["online/rfid_subset"]) and r["online/psnr"] > 5 for r in rows)
    assert len(list((tmp_path / "on").glob("online_eval_reference_6.npz"))) == 1

    # The last row is the final EMA tokenizer's evaluation on those 6 images.
    from rectok.checkpoints.loading import load_tokenizer
    from rectok.eval.fid import FIDStats
    from rectok.eval.inception import POOL_FEATURES, load_inception
    from rectok.eval.reconstruction import evaluate_reconstruction
    from rectok.training.online_eval import OnlineEvaluator

    tok = load_tokenizer(tmp_path / "on" / "tokenizer_ema.safetensors").model
    evaluator = OnlineEvaluator(
        demo_16, "val", 6, 64, torch.device("cpu"), tmp_path / "on", str(inception_weights)
    )
    net, _ = load_inception(inception_weights, (POOL_FEATURES,))
    ref = FIDStats.load(tmp_path / "on" / "online_eval_reference_6.npz")
    by_hand = evaluate_reconstruction(tok, evaluator._batches(), inception=net, reference=ref, progress=False)
    assert rows[-1]["online/psnr"] == pytest.approx(by_hand["metrics"]["PSNR"], rel=1e-5)
    assert rows[-1]["online/rfid_subset"] == pytest.approx(by_hand["metrics"]["rFID"], rel=1e-4, abs=1e-3)

    # The same training losses without it (it draws nothing from the training RNG).
    off = train.main(_args(demo_16, tmp_path / "off"))
    assert off["history"] == res["history"] and not _online_rows(tmp_path / "off")


def test_without_inception_weights_only_psnr_and_ssim(demo_16, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RECTOK_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    train.main(_args(demo_16, tmp_path / "run", "--eval_every", "2", "--data.online_eval_images", "4"))
    rows = _online_rows(tmp_path / "run")
    assert len(rows) == 1 and "online/rfid_subset" not in rows[0] and "online/ssim" in rows[0]
    assert "online evaluation without rFID" in caplog.text


def test_the_demo_has_it_off_and_the_paper_preset_on():
    assert train_config("tokenizer", "tiny").eval_every == 0
    assert train_config("tokenizer", "rectok-B").eval_every > 0
