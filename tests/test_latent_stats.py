"""`python -m rectok.training.latent_stats` on a tiny random tokenizer and a tiny generated ImageNet
folder, CPU.

Proves: the statistics equal a direct float64 computation over the same center-cropped training
images (the val split is not read); the file is the one train.py writes and sample.py reads
(tensors "mean" / "std", config and tokenizer metadata, plus provenance); --limit takes images
spread over all classes; missing inputs and a wrong output suffix fail with messages naming them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rectok.checkpoints import loading as model_io
from rectok.checkpoints import store
from rectok.data.sources import scan_image_folder
from rectok.data.transforms import center_crop_arr, load_rgb, to_tensor
from rectok.training.latent_stats import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny model on a shared 2-core machine: one intra-op thread avoids OpenMP contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A random rectok-tiny tokenizer (64 px, C = 16) in the official layout."""
    from rectok.checkpoints.official import save_official
    from rectok.models.tokenizer import RecTok, tokenizer_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_official(RecTok(tokenizer_config("rectok-tiny")), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/<2 classes>/12 random JPEGs of varied sizes (so the crop matters), val/ with 2 more."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 1)):
        for c, wnid in enumerate(("n001", "n002")):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = int(rng.integers(64, 110)), int(rng.integers(64, 110))
                # Class-dependent brightness, so per-class subsets have different statistics.
                arr = rng.integers(0, 160, (h, w, 3)) + 90 * c
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i}.JPEG", quality=90)
    return root


def direct_stats(tokenizer: Path, folder: Path, picks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean / std over every (image, token) of the posterior mean, straight from the files."""
    tok = model_io.load_tokenizer(tokenizer).model
    samples = scan_image_folder(folder)
    idx = range(len(samples)) if picks is None else picks
    x = torch.stack([to_tensor(center_crop_arr(load_rgb(samples.path(i)), tok.cfg.img_size)) for i in idx])
    with torch.no_grad():
        z = tok.encoder(x)[..., : tok.cfg.token_channels].double().reshape(-1, tok.cfg.token_channels)
    return z.mean(0), z.std(0, unbiased=False)


def run_tool(*argv: str | Path) -> None:
    assert main([str(a) for a in argv] + ["--num-workers", "0", "--device", "cpu"]) == 0


def test_stats_match_direct_float64_computation_and_train_format(tokenizer, data, tmp_path, capsys):
    out = tmp_path / "stats" / "latent_stats.safetensors"
    run_tool(tokenizer, data, "--out", out, "--batch-size", "5")  # 12 images: batches 5, 5, 2
    assert "wrote" in capsys.readouterr().out

    mean, std = model_io.read_latent_stats(out)
    ref_mean, ref_std = direct_stats(tokenizer, data / "train")
    assert mean.shape == std.shape == (16,) and mean.dtype == torch.float32
    assert float(ref_std.min()) > 1e-3  # a degenerate encoder would make the comparison vacuous
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-6)

    # The val split would change the numbers: the default split is train.
    with_val_mean, _ = direct_stats(tokenizer, data / "val")
    assert not torch.allclose(with_val_mean.float(), mean, atol=1e-3)

    # What train.py's DiT stage writes (dit_stage.py): "mean" / "std" with config and tokenizer metadata.
    tensors, meta = store.read_safetensors(out)
    assert set(tensors) == {"mean", "std"}
    assert meta["config"] == {"token_channels": 16, "grid": 4}
    assert meta["tokenizer"] == str(tokenizer)
    assert meta["tokenizer_sha256"] == store.sha256(tokenizer)
    assert meta["images"] == 12 and meta["image_size"] == 64 and meta["split"] == "train"
    assert meta["data"] == str(data.resolve())
    assert not list(out.parent.glob("*.tmp")), "the atomic write left a temp file behind"


def test_limit_takes_images_spread_over_all_classes(tokenizer, data, tmp_path):
    out = tmp_path / "stats.safetensors"
    run_tool(tokenizer, data, "--out", out, "--limit", "4", "--batch-size", "3")
    mean, std = model_io.read_latent_stats(out)
    picks = [0, 4, 7, 11]  # linspace(0, 11, 4) rounded: two images of each class
    ref_mean, ref_std = direct_stats(tokenizer, data / "train", picks)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-6)
    _, meta = store.read_safetensors(out)
    assert meta["images"] == 4 and meta["limit"] == 4


def test_explicit_split_and_bf16(tokenizer, data, tmp_path):
    out = tmp_path / "val.safetensors"
    run_tool(tokenizer, data, "--split", "val", "--out", out, "--bf16")
    mean, std = model_io.read_latent_stats(out)
    ref_mean, ref_std = direct_stats(tokenizer, data / "val")
    # bf16 encoding: close to the float32 reference at bf16 precision, not bit-equal.
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0.05, atol=0.05)
    torch.testing.assert_close(std.double(), ref_std, rtol=0.05, atol=0.05)
    assert store.read_safetensors(out)[1]["images"] == 2


def test_missing_inputs_fail_with_the_path(tokenizer, data, tmp_path):
    missing_tok = tmp_path / "no_such_tokenizer.safetensors"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        run_tool(missing_tok, data, "--out", tmp_path / "a.safetensors")
    missing_data = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        run_tool(tokenizer, missing_data, "--out", tmp_path / "b.safetensors")
    with pytest.raises(FileNotFoundError, match="nosplit"):
        run_tool(tokenizer, data, "--split", "nosplit", "--out", tmp_path / "c.safetensors")
    with pytest.raises(SystemExit):
        run_tool(tokenizer, data, "--out", tmp_path / "stats.json")
    assert not list(tmp_path.glob("*.safetensors"))


def test_command_line_reports_a_missing_tokenizer(data, tmp_path):
    missing = tmp_path / "absent_tok.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "rectok.training.latent_stats", str(missing), str(data), "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and str(missing) in result.stderr


# ----------------------------------------------------------------------------- from the tokenizer


def test_spread_takes_every_class_of_a_class_sorted_set(data):
    samples = scan_image_folder(data / "train")  # 2 classes x 6, sorted by class
    four = samples.spread(4)
    assert len(four) == 4 and set(four.labels) == {0, 1}
    assert samples.spread(0) is samples and samples.spread(100) is samples


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 2-step tokenizer run whose statistics use 6 of the 12 training images, and a 1-step DiT^DH
    run on it."""
    from conftest import load_script

    train = load_script("train.py")
    work = tmp_path_factory.mktemp("stats")
    common = [
        "--data.path", str(data), "--global_batch", "4", "--micro_batch", "4", "--log_every", "1",
        "--image_every", "0", "--ckpt_every", "0", "--tensorboard", "false", "--data.eval_images", "2",
        "--data.num_workers", "0", "--max_steps", "2",
    ]  # fmt: skip
    train.main([*common, "--run_dir", str(work / "tok"), "--data.stats_images", "6"])
    dit_args = ["--stage", "dit", "--dit.tokenizer_ckpt", str(work / "tok"), "--dit.sample_steps", "2"]
    train.main([*common, "--run_dir", str(work / "dit"), *dit_args])
    return train, work, common, dit_args


def test_the_tokenizer_stage_stores_statistics_of_its_ema_weights(trained, data):
    _, work, _, _ = trained
    state = store.load_checkpoint(work / "tok")
    stats = state["latent_stats"]
    export = model_io.load_tokenizer(work / "tok" / "tokenizer_ema.safetensors")
    assert stats["images"] == 6
    assert stats["tokenizer_fingerprint"] == model_io.tokenizer_fingerprint(export.model)
    assert export.stats_fingerprint == stats["tokenizer_fingerprint"]
    torch.testing.assert_close(export.latent_stats[0], stats["mean"], rtol=0, atol=0)
    # The same numbers as encoding those 6 evenly spread images (center crop, no flip) by hand.
    picks = scan_image_folder(data / "train").spread(6)
    images = torch.stack([to_tensor(center_crop_arr(load_rgb(picks.path(i)), 64)) for i in range(len(picks))])
    with torch.no_grad():
        mean = export.model.encoder(images)[..., :16].double().reshape(-1, 16)
    torch.testing.assert_close(stats["mean"].double(), mean.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["std"].double(), mean.std(0, unbiased=False), rtol=1e-4, atol=1e-6)


def test_the_dit_stage_and_sample_py_take_them_and_refuse_other_weights(trained, tmp_path):
    train, work, common, dit_args = trained
    tok_stats = store.load_checkpoint(work / "tok")["latent_stats"]
    dit_stats = model_io.read_latent_stats(work / "dit" / "latent_stats.safetensors")
    torch.testing.assert_close(dit_stats[0], tok_stats["mean"], rtol=0, atol=0)
    torch.testing.assert_close(dit_stats[1], tok_stats["std"], rtol=0, atol=0)

    # Statistics recorded for other weights are refused, and recomputed on request.
    state = store.load_checkpoint(work / "tok")
    state["latent_stats"] = {**state["latent_stats"], "tokenizer_fingerprint": "0" * 16}
    store.save_checkpoint(tmp_path / "other", state, state["step"])
    other = [
        *common,
        "--stage",
        "dit",
        "--dit.tokenizer_ckpt",
        str(tmp_path / "other"),
        "--dit.sample_steps",
        "2",
    ]
    with pytest.raises(ValueError, match="belong to other tokenizer weights .*--dit.latent_stats recompute"):
        train.main([*other, "--run_dir", str(tmp_path / "refused")])
    train.main([*other, "--run_dir", str(tmp_path / "recomputed"), "--dit.latent_stats", "recompute"])
    recomputed = model_io.read_latent_stats(tmp_path / "recomputed" / "latent_stats.safetensors")
    assert not torch.equal(recomputed[0], tok_stats["mean"])  # all 12 images now, not the 6

    # sample.py refuses a tokenizer other than the one the DiT^DH was trained on (raw weights here).
    from conftest import load_script

    sample = load_script("sample.py")
    args = ["--dit", str(work / "dit"), "--num-points", "2", "--per-class", "1", "--classes", "0",
            "--device", "cpu", "--out", str(tmp_path / "s"), "--no-progress"]  # fmt: skip
    raw = tmp_path / "raw.safetensors"
    from rectok.checkpoints.official import save_official

    save_official(model_io.load_tokenizer(work / "tok", use_ema=False).model, raw)
    with pytest.raises(SystemExit):
        sample.main([*args, "--tokenizer", str(raw)])
    assert sample.main(args) is not None  # its own tokenizer samples
