"""End-to-end training (train.py) on tiny presets and a tiny generated dataset, CPU only.

Proves: every stage runs and writes what it promises (checkpoint + latest + manifest,
config, metrics, EMA safetensors, image grids) with bare module names; stage 2 keeps
the encoder frozen; the DiT latent cache replays exactly the samples and flips of the
image loader; the tokenizer loss falls on demo images; an interrupted run resumed from
its checkpoint reproduces the uninterrupted per-step losses bit for bit (tokenizer with
GAN and grad accumulation across an epoch boundary, and DiT); torchrun with two gloo
ranks keeps the ranks' parameters identical; a non-finite loss skips its update, is
counted, and N in a row stop the run; bad config values (inf / NaN, zero batch, bad seed) fail
with one list of messages before the run folder is touched; a missing input or an unwritable
run folder is one line naming the path and the cause.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from rectok.checkpoints import loading, store
from rectok.training.config import from_dict
from rectok.training.latents import CachedMoments
from rectok.training.runtime import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


train = load_script("train.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(demo_16) -> Path:
    return demo_16


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--data.path", str(data), "--run_dir", str(run_dir), "--global_batch", "8", "--micro_batch", "4",
        "--log_every", "1", "--image_every", "0", "--ckpt_every", "0", "--tensorboard", "false",
        "--data.eval_images", "4", "--data.num_workers", "0", *extra,
    ]  # fmt: skip


def _no_wrapper_prefixes(state: dict) -> bool:
    return not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in state)


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("stage1")
    res = train.main(
        _args(data, run_dir, "--max_steps", "3", "--loss.gan", "0.5", "--loss.gan_start_epoch", "0")
    )
    return run_dir, res


def test_tokenizer_stage_writes_a_complete_run(stage1):
    run_dir, res = stage1
    assert res["step"] == 3 and len(res["history"]) == 3 and all(math.isfinite(v) for v in res["history"])
    for name in (
        "latest",
        "manifest.json",
        "config.json",
        "metrics.jsonl",
        "metrics.json",
        "tokenizer_ema.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "recon_0000000.png",
        "recon_0000003.png",
    ]
    state = store.load_checkpoint(run_dir)  # weights_only=True
    assert state["step"] == 3 and _no_wrapper_prefixes(state["model"]) and _no_wrapper_prefixes(state["disc"])
    assert any(k.startswith("semantic_decoder.") for k in state["model"])  # stage 1 trains the FSD/RAD head
    cfg = from_dict(state["config"])  # the checkpoint alone rebuilds the run's config
    assert (cfg.stage, cfg.preset, cfg.max_steps) == ("tokenizer", "tiny", 3)
    assert store.verify_checkpoint(store.latest_checkpoint(run_dir))
    # What produced the run: in its folder and in every checkpoint, one report.
    env = json.loads((run_dir / "environment.json").read_text())
    assert env == state["environment"] and env["torch"] == torch.__version__ and env["world_size"] == 1
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    weights, meta = store.read_safetensors(run_dir / "tokenizer_ema.safetensors")
    assert meta["config"]["semantic_dim"] == 0 and not any(k.startswith("semantic_decoder.") for k in weights)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "mse", "kl", "semantic", "gan_g", "d_loss", "grad_norm", "grad_norm_d", "lr"):
        assert key in records[-1], key
    assert records[-1]["semantic"] > 0 and records[-1]["kl"] > 0


def test_decoder_stage_trains_only_the_pixel_decoder(stage1, data, tmp_path):
    run_dir, _ = stage1
    init = store.load_checkpoint(run_dir)["model"]
    res = train.main(
        _args(data, tmp_path, "--stage", "decoder", "--tok.init_from", str(run_dir), "--max_steps", "2")
        + [
            "--loss.perceptual",
            "1.0",
            "--loss.perceptual_weights",
            "random",
            "--loss.perceptual_resize",
            "32",
        ]
    )
    tok = res["model"]
    assert tok.semantic_decoder is None
    for name, value in tok.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(value, init[name]), name  # frozen
    changed = [
        n for n, v in tok.pixel_decoder.state_dict().items() if not torch.equal(v, init[f"pixel_decoder.{n}"])
    ]
    assert changed
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["perceptual"] > 0 and "d_loss" in last and last["kl"] == 0 and last["semantic"] == 0


def test_dit_stage_with_latent_cache_replays_the_image_loader(stage1, data, tmp_path):
    run_dir, _ = stage1
    res = train.main(
        _args(data, tmp_path, "--stage", "dit", "--dit.tokenizer_ckpt", str(run_dir), "--max_steps", "3")
        + ["--dit.cache_latents", "true", "--dit.sample_steps", "3"]
    )
    assert all(math.isfinite(v) for v in res["history"])
    for name in ("dit_ema.safetensors", "latent_stats.safetensors", "images/samples_0000003.png"):
        assert (tmp_path / name).is_file(), name
    state = store.load_checkpoint(tmp_path)
    assert set(state["latent_stats"]) == {"mean", "std"} and _no_wrapper_prefixes(state["model"])

    # The cache holds plain and flipped moments; batch by batch it must equal encoding the images the
    # image loader yields for the same epoch (same order, same flips), up to float16 storage.
    from rectok.data.loading import build_loader

    tok = loading.load_tokenizer(run_dir).model
    tok.eval()
    cache = next((tmp_path / "latent_cache").glob("moments_*.npy"))
    images = build_loader(
        data, split="train", batch_size=4, image_size=64, train=True, hflip=True, num_workers=0
    )
    cached = CachedMoments(cache, images.samples, 4, 0, 1, seed=0, hflip=True)
    for epoch in (0, 1):
        images.set_epoch(epoch)
        cached.set_epoch(epoch)
        for a, b in zip(images, cached):
            assert torch.equal(a["label"], b["label"])
            with torch.no_grad():
                ref = tok.encoder(a["image"])
            torch.testing.assert_close(b["moments"], ref, rtol=2e-3, atol=2e-3)


def test_tokenizer_loss_falls_on_demo_images(data, tmp_path):
    res = train.main(
        _args(data, tmp_path, "--max_steps", "50", "--optim.warmup_epochs", "1", "--export", "false")
    )
    h = res["history"]
    first, last = float(np.mean(h[:10])), float(np.mean(h[-10:]))
    assert last < 0.6 * first, (first, last)
    assert res["eval_end"]["psnr"] > res["eval_start"]["psnr"] + 1.0


def test_resume_is_bit_exact_tokenizer_with_gan_and_accumulation(data, tmp_path):
    extra = ("--epochs", "3", "--loss.gan", "0.5", "--loss.gan_start_epoch", "1", "--export", "false")
    full = train.main(_args(data, tmp_path / "a", *extra))["history"]
    part1 = train.main(_args(data, tmp_path / "b", *extra, "--max_steps", "3"))["history"]
    # step 3 is one step into epoch 1 (2 steps per epoch, 2 micro-batches per step)
    part2 = train.main(_args(data, tmp_path / "b", *extra, "--resume", "auto"))
    assert part2["start_step"] == 3
    assert full == part1 + part2["history"]
    assert len(full) == 6


def test_resume_is_bit_exact_dit(stage1, data, tmp_path):
    run_dir, _ = stage1
    extra = ("--stage", "dit", "--dit.tokenizer_ckpt", str(run_dir), "--epochs", "2", "--export", "false")
    extra += ("--image_every", "0", "--dit.sample_steps", "2")
    full = train.main(_args(data, tmp_path / "a", *extra))["history"]
    part1 = train.main(_args(data, tmp_path / "b", *extra, "--max_steps", "1"))["history"]
    part2 = train.main(_args(data, tmp_path / "b", *extra, "--resume", str(tmp_path / "b")))["history"]
    assert full == part1 + part2 and len(full) == 4


def test_nonfinite_loss_skips_update_counts_and_stops(data, tmp_path):
    poisoned = train.main(_args(data, tmp_path / "nan", "--max_steps", "3", "--debug_nan_steps", "2"))
    assert poisoned["nonfinite_total"] == 1 and math.isnan(poisoned["history"][2])
    clean = train.main(_args(data, tmp_path / "clean", "--max_steps", "2"))
    # the poisoned step changed nothing: weights and EMA equal those of the run that stopped before it
    for (name, a), b in zip(poisoned["model"].state_dict().items(), clean["model"].state_dict().values()):
        assert torch.equal(a, b), name
    for name, value in poisoned["ema"].params.items():
        assert torch.equal(value, clean["ema"].params[name]), name
    assert json.loads((tmp_path / "nan" / "metrics.json").read_text())["nonfinite_steps"] == 1

    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        train.main(
            _args(
                data,
                tmp_path / "stop",
                "--max_steps",
                "5",
                "--debug_nan_steps",
                "1,2",
                "--max_nonfinite",
                "2",
            )
        )
    assert store.list_checkpoints(tmp_path / "stop") == []  # nothing written after the stop


def test_bad_config_values_fail_clearly(data, tmp_path):
    with pytest.raises(ValueError, match="optim.lr must be >= 0"):
        train.main(_args(data, tmp_path, "--lr", "-1"))
    with pytest.raises(ValueError, match="unknown preset 'nope' for stage 'tokenizer'"):
        train.main(_args(data, tmp_path, "--preset", "nope"))
    with pytest.raises(ValueError, match="mask ratio range"):
        train.main(_args(data, tmp_path, "--tok.mask_ratio_max", "1.5"))
    with pytest.raises(ValueError, match="global_batch 6 must be a multiple of micro_batch 4"):
        train.main(_args(data, tmp_path, "--global_batch", "6"))
    with pytest.raises(ValueError, match="loss.kl and loss.semantic must be 0"):
        train.main(_args(data, tmp_path, "--stage", "decoder", "--loss.kl", "1e-6"))
    # the command line reports it as a message with exit code 2, not a traceback
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--optim.schedule", "linear"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "optim.schedule must be one of cosine" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--lr", "inf"], ["optim.lr must be a finite number, got inf"]),
        (["--optim.lr", "nan"], ["optim.lr must be a finite number, got nan"]),
        (["--epochs", "inf"], ["epochs must be a finite number, got inf"]),
        (["--seed", "-1"], ["seed must be an integer in [0, "]),
        (["--tok.preset", "nope"], ["tok.preset must be one of rectok-B"]),
        (["--data.crop", "square"], ["data.crop must be one of center, random_resized"]),
        (["--tok.noise_schedule", "cosine"], ["tok.noise_schedule must be one of shift, uniform, lognorm"]),
        # micro_batch 0 must not stop the validator with a ZeroDivisionError: every error is listed
        (
            ["--micro_batch", "0", "--lr", "-1", "--seed", "-2"],
            ["global_batch and micro_batch must be >= 1", "optim.lr must be >= 0", "seed must be"],
        ),
    ],
)
def test_bad_numbers_are_listed_before_anything_is_written(data, tmp_path, extra, expected):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        train.main(_args(data, run_dir, *extra))
    message = str(info.value)
    assert all(e in message for e in expected), message
    assert message.count("\n  - ") == len(expected), message  # NaN is not reported twice
    assert not run_dir.exists()


def test_missing_inputs_and_unwritable_run_dir_are_one_clear_line(data, tmp_path, monkeypatch):
    from rectok.training.runtime import RunDirError

    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--data.path \S*nope: no such file or folder"):
        train.main(_args(tmp_path / "nope", run_dir))
    with pytest.raises(ValueError, match=r"--resume \S*gone.pt: no such file or folder"):
        train.main(_args(data, run_dir, "--resume", str(tmp_path / "gone.pt")))
    assert not run_dir.exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(RunDirError, match=f"--run_dir {a_file}/run: {a_file} is a file, not a folder"):
        train.main(_args(data, a_file / "run"))

    # A read-only or full disk (simulated: as root, chmod does not stop writes).
    def refuse(path, write):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(store, "atomic_write", refuse)
    with pytest.raises(RunDirError, match=r"--run_dir \S+: Read-only file system: \S+config.json"):
        train.main(_args(data, run_dir))
    monkeypatch.undo()
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(RunDirError, match="Permission denied"):
            train.main(_args(data, locked / "run"))

    # the command line: one ERROR line, exit code 4, no traceback
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--run_dir", str(a_file / "run")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip() == f"ERROR: cannot create or write the run folder --run_dir {a_file}/run: " + (
        f"{a_file} is a file, not a folder"
    )


def test_config_presets_overrides_and_batch_geometry(tmp_path):
    from rectok.training.config import parse_args, train_config

    s1 = parse_args(["--stage", "tokenizer", "--preset", "rectok-B"])
    assert s1.base_lr() == pytest.approx(4e-4)  # 1e-4 * 1024 / 256
    assert (s1.epochs, s1.optim.warmup_epochs, s1.loss.gan_start_epoch, s1.optim.ema_decay) == (
        200,
        50,
        100,
        0.999,
    )
    assert s1.grad_accum(world_size=8) == 2 and s1.grad_accum(world_size=16) == 1  # global 1024, 64 per GPU
    s2 = train_config("decoder", "rectok-B", tok__init_from="runs/x")
    assert s2.base_lr() == pytest.approx(2e-4) and s2.loss.kl == 0 and s2.loss.gan_start_epoch == 0
    xl = train_config("dit", "dit-dh-xl", dit__tokenizer_ckpt="t.pt")
    o = xl.optim
    assert (o.schedule, o.lr, o.min_lr, o.hold_epochs, o.decay_end_epochs) == (
        "const_linear",
        2e-4,
        2e-5,
        40,
        800,
    )
    assert (o.weight_decay, o.grad_clip, o.ema_decay, xl.epochs) == (0.0, 1.0, 0.9995, 80)
    assert train_config("dit", "dit-dh-s", dit__tokenizer_ckpt="t.pt").dit.preset == "dit-dh-s"
    # defaults -> preset -> JSON file -> command line; --lr is the unique alias of --optim.lr
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lr": 0.5, "beta2": 0.9}, "seed": 3}))
    cfg = parse_args(["--config", str(tmp_path / "c.json"), "--lr", "0.25", "--compile"])
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.seed, cfg.compile) == (0.25, 0.9, 3, True)
    with pytest.raises(ValueError, match="world size 3"):
        s1.grad_accum(world_size=3)
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        train_config("tokenizer", "tiny", optim__lrr=1.0)
    # The official presets leave their required inputs to the command line (README's commands).
    dec = parse_args(["--stage", "decoder", "--preset", "rectok-B", "--tok.init_from", "runs/tok"])
    dit = parse_args(["--stage", "dit", "--preset", "dit-dh-xl", "--dit.tokenizer_ckpt", "runs/dec"])
    assert (dec.tok.init_from, dit.dit.tokenizer_ckpt) == ("runs/tok", "runs/dec")
    with pytest.raises(ValueError, match="the decoder stage needs --tok.init_from"):
        parse_args(["--stage", "decoder", "--preset", "rectok-B"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_keep_identical_parameters(data, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, sys, torch, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'train.py')!r})\n"
        "train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)\n"
        "res = train.main(sys.argv[1:])\n"
        "out = os.path.join(os.environ['OUT'], 'rank' + os.environ['RANK'] + '.pt')\n"
        "torch.save(res['model'].state_dict(), out)\n"
    )
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # global batch 8 = 2 ranks x micro-batch 2 x 2 accumulation steps; GAN on (a second DDP module)
    args = _args(data, tmp_path / "run", "--max_steps", "3", "--micro_batch", "2", "--loss.gan", "0.5")
    args += ["--loss.gan_start_epoch", "0"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    proc = subprocess.run(
        cmd + [str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = store.load_checkpoint(tmp_path / "run")
    assert _no_wrapper_prefixes(saved["model"]) and len(saved["rng"]) == 2  # per-rank RNG states
    assert all(torch.equal(saved["model"][k], a[k]) for k in a)
    assert saved["data"]["world_size"] == 2 and saved["data"]["accum"] == 2


def test_torchrun_fsdp_dit_sharded_checkpoints_resume_bit_exact(stage1, data, tmp_path):
    """FSDP2 over two gloo ranks: checkpoints are DCP shards written by every rank (no gather; the
    .pt holds no weights; async_save writes them in the background), the EMA export is one full
    file, and a run resumed from the step-2 shards ends bit-identical to the uninterrupted one."""
    run_dir, _ = stage1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _args(
        data, tmp_path / "run", "--stage", "dit", "--dit.tokenizer_ckpt", str(run_dir), "--max_steps", "4"
    )
    args += ["--micro_batch", "2", "--dit.parallel", "fsdp", "--dit.sample_steps", "2", "--ckpt_every", "2"]
    args += ["--dit.async_save", "true"]  # the step-2 shards are written in the background
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

    def torchrun(*argv: str) -> None:
        proc = subprocess.run(
            [*cmd, f"--master_port={_free_port()}", str(ROOT / "train.py"), *argv],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-6000:]

    torchrun(*args)
    saved = store.load_checkpoint(tmp_path / "run")
    assert "model" not in saved and "optimizer" not in saved and saved["step"] == 4
    shards = tmp_path / "run" / saved["sharded"]["dir"]
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (tmp_path / "run" / "ckpt_000000002.dcp").is_dir()
    from rectok.models.dit import DiTDH, DiTDHConfig

    model = DiTDH(DiTDHConfig(**saved["model_config"]))
    weights, meta = store.read_safetensors(tmp_path / "run" / "dit_ema.safetensors")
    assert set(weights) == set(model.state_dict()) and meta["step"] == 4
    model.load_state_dict(weights)  # full, unsharded tensors with bare names
    # The run folder still loads for sampling: its latest .pt has no weights, so its EMA export is read.
    loaded = loading.load_dit(tmp_path / "run").model.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)

    # Resume from the step-2 shards in a copy of the run: the same steps 3-4, the same final EMA.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    for late in (
        "ckpt_000000004.pt",
        "ckpt_000000004.dcp",
        "dit_ema.safetensors",
        "dit_ema.safetensors.sha256",
    ):
        path = tmp_path / "resumed" / late
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    torchrun(
        *[a if a != str(tmp_path / "run") else str(tmp_path / "resumed") for a in args], "--resume", "auto"
    )
    again, _ = store.read_safetensors(tmp_path / "resumed" / "dit_ema.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(tmp_path / "run")] == [r["loss"] for r in rows(tmp_path / "resumed")]


def test_latent_cache_tag_follows_tokenizer_weights_and_data(tmp_path):
    """The latent cache is shared by identical runs and never reused with other weights or data."""
    from rectok.models.tokenizer import RecTok, tokenizer_config
    from rectok.training.latents import latent_cache_tag

    torch.manual_seed(0)
    tok = RecTok(tokenizer_config("rectok-tiny"))
    twin = RecTok(tokenizer_config("rectok-tiny"))
    twin.load_state_dict(tok.state_dict())
    assert latent_cache_tag(tok, tmp_path) == latent_cache_tag(twin, tmp_path)
    assert latent_cache_tag(tok, tmp_path) != latent_cache_tag(tok, tmp_path / "other")
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-3
    assert latent_cache_tag(tok, tmp_path) != latent_cache_tag(twin, tmp_path)


def test_unreadable_images_are_counted_in_metrics(data, tmp_path):
    # One training image truncated (16 stay in the folder, so one epoch of 2 steps at batch 8 meets
    # every file) and one of the 8 val images replaced by garbage; all 8 val images are requested.
    root = tmp_path / "data"
    shutil.copytree(data, root)
    train_file = sorted((root / "train").rglob("*.JPEG"))[3]
    train_file.write_bytes(train_file.read_bytes()[:200])
    val_file = sorted((root / "val").rglob("*.JPEG"))[0]
    val_file.write_text("not an image")
    args = _args(root, tmp_path / "run", "--max_steps", "2", "--data.eval_images", "8")
    res = train.main([*args, "--data.num_workers", "1"])  # the count must survive a worker process
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["heldout_images"], metrics["heldout_skipped"]) == (7, 1)
    assert metrics["skipped_images"] == 1 and res["skipped_images"] == 1


def test_losses_read_only_at_log_steps_are_the_same_history(data, tmp_path, stage1):
    # The loop reads the losses to the host at log steps only (one sync for all the steps since
    # the last one): the history and the logged records must be those of --log_every 1.
    _, every_step = stage1
    res = train.main(
        _args(data, tmp_path, "--max_steps", "3", "--loss.gan", "0.5", "--loss.gan_start_epoch", "0",
              "--log_every", "2")
    )  # fmt: skip
    assert res["history"] == every_step["history"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [2, 3]
    assert [r["loss"] for r in logged if "loss" in r] == every_step["history"][1:]
