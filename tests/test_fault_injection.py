"""Faults injected into whole training runs (tiny presets, CPU): the run survives them, says what
happened, leaves no debris and, resumed, trains exactly as if nothing had happened.

Proves (issue 13 items 1-9 beyond the unit tests of test_resume_faults.py):
- a death between writing a checkpoint's temp file and renaming it (the tokenizer and the DiT^DH
  stage) is resumed with `--resume auto`: the temp file is removed and the per-step losses in
  metrics.jsonl, the final weights and the EMA equal an uninterrupted run's bit for bit;
- a full disk during a checkpoint write is an OSError naming the file, the previous checkpoint
  stays intact and verifies, nothing is left behind, and the run resumes from it exactly;
- the latent cache is never read half-written: a build killed before its rename, a cache without
  a completion record, a truncated file or an unreadable record are rebuilt with a warning, and
  the rebuilt run trains exactly as a clean one; rows of unreadable images hold the next readable
  image's moments;
- a DiT^DH run refuses to resume on another tokenizer's latents (weights fingerprint);
- unreadable training images met before an interruption still count in metrics.json after it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rectok.checkpoints import store
from rectok.training import latents


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so no handler of ours can swallow it."""


def _die_before_rename(monkeypatch, name_part: str, nth: int = 1) -> None:
    """os.replace of the `nth` file whose target contains `name_part` "dies" instead: Killed is raised
    and the source is left as a real kill leaves it (atomic_write's temp file under a name of its
    pattern, since its own cleanup would not run)."""
    real_replace, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if name_part in Path(dst).name:
            seen.append(dst)
            if len(seen) == nth:
                if str(src).endswith(".tmp"):  # atomic_write's temp file (the cache's .partial stays)
                    real_replace(src, Path(dst).with_name(f".{Path(dst).name}.killed00.tmp"))
                raise Killed(f"killed before renaming onto {dst}")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(scope="module")
def data(demo_16) -> Path:
    return demo_16


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--data.path", str(data), "--run_dir", str(run_dir), "--global_batch", "8", "--micro_batch", "8",
        "--log_every", "1", "--image_every", "0", "--ckpt_every", "1", "--keep_last", "2",
        "--tensorboard", "false", "--data.eval_images", "2", "--data.num_workers", "0", *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = store.load_checkpoint(run_dir)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"]["params"].items()}}


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b)  # per step, bit for bit (JSON keeps every digit of a float)
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _debris(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".partial"))]


@pytest.fixture(scope="module")
def tokenizer_run(data, tmp_path_factory) -> Path:
    from conftest import load_script

    run = tmp_path_factory.mktemp("tok")
    load_script("train.py").main(_args(data, run, "--max_steps", "1", "--ckpt_every", "0"))
    return run


# ------------------------------------------------------------------------------ tokenizer stage
def test_tokenizer_killed_inside_a_checkpoint_write_resumes_bit_exactly(
    train_script, data, tmp_path, monkeypatch, caplog
):
    steps = ("--max_steps", "4", "--export", "false")
    train_script.main(_args(data, tmp_path / "clean", *steps))
    run = tmp_path / "killed"
    with monkeypatch.context() as m:
        _die_before_rename(m, store.checkpoint_name(3))
        with pytest.raises(Killed):
            train_script.main(_args(data, run, *steps))
    assert store.checkpoint_name(3) not in [p.name for p in store.list_checkpoints(run)]
    assert _debris(run) == [f".{store.checkpoint_name(3)}.killed00.tmp"]
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.store"):
        res = train_script.main(_args(data, run, *steps, "--resume", "auto"))
    assert res["start_step"] == 2  # one step lost: the one whose checkpoint was being written
    assert "removed 1 temp file(s)" in caplog.text and "sha256 verified" in caplog.text
    assert _debris(run) == []
    _assert_same_run(tmp_path / "clean", run)


def test_full_disk_during_a_save_is_one_clear_error_and_loses_nothing(
    train_script, data, tmp_path, monkeypatch
):
    steps = ("--max_steps", "3", "--export", "false")
    train_script.main(_args(data, tmp_path / "clean", *steps))
    run, real_save, calls = tmp_path / "full", torch.save, []

    def save_until_disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_until_disk_full)
        with pytest.raises(OSError) as info:
            train_script.main(_args(data, run, *steps))
    message = str(info.value)
    assert "No space left on device" in message and store.checkpoint_name(2) in message
    assert "previous copy is intact" in message
    assert [p.name for p in store.list_checkpoints(run)] == [store.checkpoint_name(1)]
    assert store.verify_checkpoint(run / store.checkpoint_name(1)) and _debris(run) == []
    train_script.main(_args(data, run, *steps, "--resume", "auto"))
    _assert_same_run(tmp_path / "clean", run)


def test_unreadable_images_met_before_an_interruption_still_count(train_script, data, tmp_path):
    from rectok.data.loading import build_loader
    from rectok.data.sharding import ShardedSampler

    root = tmp_path / "data"
    shutil.copytree(data, root)
    samples = build_loader(root, split="train", batch_size=8, image_size=64, train=True).samples
    first_step = ShardedSampler(len(samples), 0, 1, True, seed=0).indices(0)[:8]
    bad = Path(samples.path(first_step[0]))  # met by step 1 only (epoch 0 draws each image once)
    bad.write_bytes(bad.read_bytes()[:100])
    run = tmp_path / "run"
    train_script.main(_args(root, run, "--max_steps", "1", "--export", "false"))
    res = train_script.main(_args(root, run, "--max_steps", "2", "--export", "false", "--resume", "auto"))
    assert res["start_step"] == 1 and res["skipped_images"] == 1
    assert json.loads((run / "metrics.json").read_text())["skipped_images"] == 1


# ------------------------------------------------------------------------------ DiT^DH stage
def _dit(tokenizer: Path, *extra: str) -> tuple[str, ...]:
    return ("--stage", "dit", "--dit.tokenizer_ckpt", str(tokenizer), "--dit.sample_steps", "2",
            "--export", "false", *extra)  # fmt: skip


def test_dit_killed_in_cache_build_and_in_a_save_resumes_bit_exactly(
    train_script, data, tokenizer_run, tmp_path, monkeypatch, caplog
):
    steps = _dit(tokenizer_run, "--max_steps", "3", "--dit.cache_latents", "true")
    train_script.main(_args(data, tmp_path / "clean", *steps))
    run = tmp_path / "killed"
    with monkeypatch.context() as m:  # first death: the cache is written but not yet renamed
        _die_before_rename(m, ".npy")
        with pytest.raises(Killed):
            train_script.main(_args(data, run, *steps))
    cache_dir = run / "latent_cache"
    assert [p.name for p in cache_dir.glob("moments_*.npy")] == []
    assert [p.suffix for p in cache_dir.iterdir() if not p.name.startswith(".")] == [".partial"]
    with monkeypatch.context() as m:  # second death: inside the step-2 checkpoint write
        _die_before_rename(m, store.checkpoint_name(2))
        with caplog.at_level(logging.WARNING), pytest.raises(Killed):
            train_script.main(_args(data, run, *steps, "--resume", "auto"))
    assert "left by an interrupted build; rebuilding it" in caplog.text
    res = train_script.main(_args(data, run, *steps, "--resume", "auto"))
    assert res["start_step"] == 1 and _debris(run) == []
    _assert_same_run(tmp_path / "clean", run)
    record = json.loads(next(cache_dir.glob("moments_*.done")).read_text())
    assert record["unreadable"] == 0 and record["shape"][0] == 16

    # A cache damaged after it was completed (here truncated) is rebuilt, not read.
    cache = next(cache_dir.glob("moments_*.npy"))
    cache.write_bytes(cache.read_bytes()[:-64])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_script.main(_args(data, tmp_path / "reuse", *steps, "--dit.cache_dir", str(cache_dir)))
    assert "(truncated?); rebuilding it" in caplog.text
    _assert_same_run(tmp_path / "clean", tmp_path / "reuse")


def test_dit_refuses_to_resume_on_another_tokenizers_latents(train_script, data, tokenizer_run, tmp_path):
    other = tmp_path / "other_tok"
    train_script.main(_args(data, other, "--max_steps", "1", "--ckpt_every", "0", "--seed", "1"))
    run = tmp_path / "dit"
    train_script.main(_args(data, run, *_dit(tokenizer_run, "--max_steps", "1")))
    with pytest.raises(ValueError, match="fingerprint .* pass the same tokenizer"):
        train_script.main(_args(data, run, *_dit(other, "--max_steps", "2", "--resume", "auto")))


# ------------------------------------------------------------------------------ latent cache files
def test_cache_problems_are_named(tmp_path):
    shape = (4, 2, 3, 8)
    path, partial, marker = latents.cache_paths(tmp_path, "tag")
    assert latents.cache_problem(path, marker, shape) is None  # nothing there yet: build it
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape).flush()
    assert "no completion record" in latents.cache_problem(path, marker, shape)
    record = {"format": latents.CACHE_FORMAT, "shape": list(shape), "bytes": path.stat().st_size}
    marker.write_text(json.dumps(record))
    assert latents.cache_problem(path, marker, shape) is None
    assert "built for shape" in latents.cache_problem(path, marker, (5, 2, 3, 8))
    path.write_bytes(path.read_bytes()[:-10])
    assert "truncated" in latents.cache_problem(path, marker, shape)
    marker.write_text("{not json")
    assert "unreadable" in latents.cache_problem(path, marker, shape)


def test_unreadable_rows_get_the_next_readable_images_moments(tmp_path):
    path = tmp_path / "m.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(5, 2, 1, 2))
    rows[:] = np.arange(5, dtype=np.float16)[:, None, None, None]
    rows.flush()
    del rows
    latents._fill_unreadable_rows(path, [1, 2, 4], 5)  # 1, 2 -> 3; 4 wraps around to 0
    assert np.load(path)[:, 0, 0, 0].tolist() == [0, 3, 3, 3, 0]
    with pytest.raises(ValueError, match="none of the 5"):
        latents._fill_unreadable_rows(path, [0, 1, 2, 3, 4], 5)


# ------------------------------------------------------------------------------ loading trained models
def test_damaged_tokenizer_checkpoints_and_exports_are_refused(data, tokenizer_run, tmp_path):
    from rectok.checkpoints import loading as model_io

    run = tmp_path / "tok"
    shutil.copytree(tokenizer_run, run)
    ckpt_file, export = store.latest_checkpoint(run), run / "tokenizer_ema.safetensors"
    assert model_io.load_tokenizer(ckpt_file).layout == "ours"
    assert model_io.load_tokenizer(export).layout == "ours"
    assert store.sha256_sidecar(export).read_text().split() == [store.sha256(export), export.name]

    raw = bytearray(ckpt_file.read_bytes())
    raw[-2000] ^= 0xFF
    ckpt_file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tokenizer checkpoint: .* is damaged: sha256"):
        model_io.load_tokenizer(ckpt_file)

    good = export.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x01
    export.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is damaged: sha256"):
        model_io.load_tokenizer(export)
    model_io.load_tokenizer(export, verify="size")  # one flipped bit of a weight: only sha256 sees it
    export.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        model_io.load_tokenizer(export, verify="size")


def test_non_finite_tokenizer_weights_are_refused(tokenizer_run, tmp_path):
    from safetensors.torch import save_file

    from rectok.checkpoints import loading as model_io

    state, meta = store.read_safetensors(tokenizer_run / "tokenizer_ema.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    bad = tmp_path / "nan.safetensors"  # written by hand: export_safetensors itself refuses NaN
    save_file(state, str(bad), metadata={k: json.dumps(v) for k, v in meta.items()})
    with pytest.raises(ValueError, match=f"non-finite weights in .*{name}"):
        model_io.load_tokenizer(bad)
