"""Resuming never trains silently on damaged state and a run never leaves debris
(rectok/checkpoints/store.py).

Proves, on small fake run folders (a few Linear layers saved with save_checkpoint):
- a checkpoint with flipped bytes fails its manifest sha256; `--resume auto` skips it for the
  newest one that verifies, and warns which one it took and which it skipped and why;
- a truncated or zero-byte newest checkpoint is skipped with a non-empty reason; with
  --ckpt_verify size a same-size flip passes the check (it is the cheap mode) but a truncation
  does not, and a damaged file that still has the manifest's size is caught by torch.load;
- an explicit --resume FILE that fails verification is one ValueError naming file and reason;
- `latest` naming a missing file is reported together with the checkpoint chosen instead;
- a run folder with a previous run (checkpoints, manifest, metrics) but nothing usable is
  never silently restarted at step 0: "" and "auto" refuse, "never" archives the old files;
  "auto" over a run killed before its first save (metrics only) archives them and starts again;
- temp files of interrupted atomic saves are removed at start and reported (count, bytes),
  other dot-files are left alone;
and end to end with the tiny tokenizer training: damaging the newest checkpoint makes
`--resume auto` continue from the previous one, and a second plain run in the folder refuses;
resuming from an older checkpoint cuts metrics.jsonl (and TensorBoard) back to the resume step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from rectok.checkpoints import store

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, steps=(10, 20, 30)) -> list[Path]:
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    return [
        store.save_checkpoint(tmp_path, {"model": model.state_dict(), "step": s}, step=s, keep_last=0)
        for s in steps
    ]


def _flip(path: Path, offset: int = -40) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_full_verification_passes_and_logs_its_time(tmp_path, caplog):
    paths = _run(tmp_path)
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.store"):
        path, state = store.resolve_resume("auto", tmp_path)
    assert path == paths[-1] and state["step"] == 30
    assert "sha256 verified" in caplog.text and " s)" in caplog.text
    assert _warnings(caplog) == ""  # a healthy run folder resumes without a word of warning


def test_flipped_bytes_are_detected_and_skipped(tmp_path, caplog):
    paths = _run(tmp_path)
    _flip(paths[-1])
    assert store.check_checkpoint(paths[-1], "full").startswith("sha256")
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        path, state = store.resolve_resume("auto", tmp_path)
    assert path == paths[1] and state["step"] == 20
    text = _warnings(caplog)
    assert "skipping checkpoint" in text and paths[-1].name in text and "sha256" in text
    assert f"resuming from {paths[1].name} instead of {paths[-1].name}" in text


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_truncated_or_empty_newest_is_skipped_with_a_reason(tmp_path, caplog, damage):
    paths = _run(tmp_path)
    raw = paths[-1].read_bytes()
    paths[-1].write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"")
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        path, _ = store.resolve_resume("auto", tmp_path)
    assert path == paths[1]
    line = next(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    reason = line.split(f"{paths[-1]}: ", 1)[1]
    assert reason.strip()  # never an empty reason (an empty file once gave str(EOFError()) == "")
    assert ("size" if damage == "truncated" else "empty") in reason


def test_size_mode_checks_bytes_only_and_torch_load_still_guards(tmp_path, caplog):
    paths = _run(tmp_path)
    _flip(paths[-1])
    assert store.check_checkpoint(paths[-1], "size") is None  # same size: the cheap mode cannot tell
    raw = paths[-2].read_bytes()
    paths[-2].write_bytes(raw[:-100])
    assert "size" in store.check_checkpoint(paths[-2], "size")
    # not listed in the manifest: nothing to compare with, so only torch.load can reject it
    manifest = store.read_manifest(tmp_path)
    del manifest[paths[-1].name]
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    paths[-1].write_bytes(b"PK" + b"\0" * 200)
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        path, _ = store.resolve_resume("auto", tmp_path, verify="size")
    assert path == paths[0]
    text = _warnings(caplog)
    assert "not listed" in text and "torch.load failed" in text and f"{paths[-2].name} (size" in text


def test_explicit_damaged_file_is_one_clear_value_error(tmp_path):
    paths = _run(tmp_path)
    _flip(paths[-1])
    with pytest.raises(ValueError, match=rf"cannot resume from {paths[-1]}: sha256 .* differs") as err:
        store.resolve_resume(str(paths[-1]), tmp_path)
    assert err.value.__cause__ is None  # our message, not a torch.load traceback
    paths[0].write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        store.resolve_resume(str(paths[0]), tmp_path)
    # unlisted garbage: the torch.load error is wrapped into one message naming the file
    other = tmp_path / "elsewhere" / "ckpt_000000001.pt"
    other.parent.mkdir()
    other.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{other} could not be read"):
        store.resolve_resume(str(other), tmp_path)
    with pytest.raises(ValueError, match="invalid choice|must be one of"):
        store.check_checkpoint(paths[1], "sometimes")


def test_latest_naming_a_missing_file_says_what_was_chosen(tmp_path, caplog):
    paths = _run(tmp_path)
    (tmp_path / store.LATEST).write_text("ckpt_000000040.pt\n")
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        path, _ = store.resolve_resume("auto", tmp_path)
    assert path == paths[-1]
    text = _warnings(caplog)
    assert "ckpt_000000040.pt, which does not exist" in text
    assert f"resuming from {paths[-1].name} instead of ckpt_000000040.pt" in text


def test_used_run_folder_is_never_silently_restarted(tmp_path, caplog):
    paths = _run(tmp_path)
    for p in paths:
        p.write_bytes(b"")
    with pytest.raises(ValueError, match="no checkpoint in it is usable.*--resume never"):
        store.resolve_resume("auto", tmp_path)
    with pytest.raises(ValueError, match="holds a previous run .*--resume is not set"):
        store.prepare_run_dir("", tmp_path)
    # only metrics left (e.g. the checkpoints were deleted by hand) still counts as a previous run
    other = tmp_path / "metrics_only"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl"):
        store.prepare_run_dir("", other)
    with pytest.raises(ValueError, match="metrics.jsonl"):
        store.resolve_resume("auto", other)
    (other / "metrics.jsonl").write_text("")  # an empty log (a run that stopped at once) is no run
    assert store.prepare_run_dir("", other) == []
    # --resume auto over a run killed before its first save (metrics, no checkpoint, manifest or
    # `latest` ever written): nothing to resume, nothing to lose; it starts again, the metrics moved
    # aside, so that a retry loop does not stall on it.
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        moved = store.prepare_run_dir("auto", other)
    assert [p.name for p in moved] == ["metrics.jsonl"] and "no checkpoint was ever written" in caplog.text
    assert store.resolve_resume("auto", other) == (None, None)
    caplog.clear()
    # --resume never: the old files move aside, the folder is then fresh
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        moved = store.prepare_run_dir("never", tmp_path)
    assert {p.name for p in moved} == {p.name for p in paths} | {store.LATEST, store.MANIFEST}
    assert all(p.is_file() and p.parent.name.startswith("previous-") for p in moved)
    assert store.previous_run_files(tmp_path) == [] and "moved the previous run" in caplog.text
    assert store.resolve_resume("auto", tmp_path) == (None, None)


def test_temp_files_of_interrupted_saves_are_removed_and_reported(tmp_path, caplog):
    _run(tmp_path, steps=(10,))
    debris = {
        ".ckpt_000000020.pt.k3j_9xq2.tmp": 1000,
        ".manifest.json.abcdefgh.tmp": 24,
        ".latest.ZZ00aa11.tmp": 0,
    }
    for name, size in debris.items():
        (tmp_path / name).write_bytes(b"x" * size)
    keep = [tmp_path / ".notes.tmp", tmp_path / "mine.tmp", tmp_path / ".ckpt.pt.short.tmp"]
    for p in keep:
        p.write_bytes(b"user")
    with caplog.at_level(logging.WARNING, logger="rectok.checkpoints.store"):
        assert store.remove_temp_files(tmp_path) == (3, 1024)
        store.prepare_run_dir("auto", tmp_path)  # what Run calls at start; nothing left to remove
    assert not any((tmp_path / name).exists() for name in debris)
    assert all(p.is_file() for p in keep)
    assert "removed 3 temp file(s)" in caplog.text and "1.0 KiB" in caplog.text
    assert caplog.text.count("removed") == 1


# ------------------------------------------------------------------ end to end (tiny tokenizer, CPU)
@pytest.fixture
def train(train_script):
    return train_script


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from rectok.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(
        tmp_path_factory.mktemp("demo"), train_per_class=1, val_per_class=1, min_size=64, max_size=80
    )


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--data.path", str(data), "--run_dir", str(run_dir), "--global_batch", "4", "--micro_batch", "4",
        "--log_every", "1", "--image_every", "0", "--ckpt_every", "1", "--keep_last", "0",
        "--tensorboard", "false", "--data.eval_images", "2", "--data.num_workers", "0", "--export", "false",
        *extra,
    ]  # fmt: skip


def test_training_skips_a_damaged_checkpoint_and_refuses_a_plain_restart(train, data, tmp_path, caplog):
    run = tmp_path / "run"
    train.main(_args(data, run, "--max_steps", "2"))
    names = [p.name for p in store.list_checkpoints(run)]
    assert names == [store.checkpoint_name(1), store.checkpoint_name(2)]
    _flip(run / names[-1])
    (run / f".{names[-1]}.a1b2c3d4.tmp").write_bytes(b"partial")
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.store"):
        res = train.main(_args(data, run, "--max_steps", "3", "--resume", "auto"))
    assert res["start_step"] == 1  # not 2: that one is damaged
    assert f"skipping checkpoint {run / names[-1]}: sha256" in caplog.text
    assert "removed 1 temp file(s)" in caplog.text and "sha256 verified" in caplog.text
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # step 2 redone, logged once
    with pytest.raises(ValueError, match="holds a previous run"):
        train.main(_args(data, run, "--max_steps", "1"))
    assert (run / "metrics.jsonl").read_text().splitlines() == lines  # the refusal wrote nothing
    res = train.main(_args(data, run, "--max_steps", "1", "--resume", "never"))
    assert res["start_step"] == 0 and [p.name for p in store.list_checkpoints(run)] == [names[0]]
    assert len(list(run.glob("previous-*/metrics.jsonl"))) == 1


def test_resume_cuts_metrics_and_tensorboard_back_to_the_resume_step(train, data, tmp_path):
    """Resuming from an older checkpoint redoes later steps: their rows from the earlier run are
    dropped (metrics.jsonl; TensorBoard through purge_step), and the redone rows equal them."""
    run = tmp_path / "run"
    tb = ("--tensorboard", "true")
    train.main(_args(data, run, "--max_steps", "3", *tb))
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss"')  # the torn last line of a killed run
    res = train.main(
        _args(data, run, "--max_steps", "3", "--resume", str(run / store.checkpoint_name(1)), *tb)
    )
    assert res["start_step"] == 1
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for old, new in zip(first, rows):
        assert old["loss"] == new["loss"], (old, new)  # bit-exact resume, each step once
