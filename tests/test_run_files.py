"""Files a run writes are readable by the group, and its messages count steps as metrics do.

Proves: checkpoints, the manifest, `latest`, safetensors exports and official-layout exports get
the mode a plain open() gives (0666 less the umask), not mkstemp's 0600; the non-finite-step
message names the step number that metrics.jsonl records for that step.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
from torch import nn

from rectok.checkpoints import store
from rectok.checkpoints.official import save_official
from rectok.models.tokenizer import RecTok, tokenizer_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield 0o644
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    model = nn.Linear(4, 4)
    path = store.save_checkpoint(tmp_path, {"model": model.state_dict(), "step": 1}, step=1, keep_last=0)
    store.export_safetensors(tmp_path / "weights.safetensors", model.state_dict(), {"kind": "test"}, step=1)
    tok = RecTok(tokenizer_config("rectok-tiny"))
    save_official(tok, tmp_path / "official.safetensors")
    save_official(tok, tmp_path / "official.pt")
    for p in (path, tmp_path / store.MANIFEST, tmp_path / store.LATEST, tmp_path / "weights.safetensors",
              tmp_path / "official.safetensors", tmp_path / "official.pt"):  # fmt: skip
        assert _mode(p) == umask_022, (p.name, oct(_mode(p)))
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))  # no debris


def test_nonfinite_message_names_the_metrics_step(tmp_path, capsys, train_script):
    from rectok.data.demo import ensure_demo_dataset

    train = train_script
    data = ensure_demo_dataset(
        tmp_path / "demo", train_per_class=1, val_per_class=1, min_size=64, max_size=80
    )
    run = tmp_path / "run"
    train.main([
        "--data.path", str(data), "--run_dir", str(run), "--global_batch", "4", "--micro_batch", "4",
        "--log_every", "1", "--image_every", "0", "--ckpt_every", "0", "--tensorboard", "false",
        "--data.eval_images", "2", "--data.num_workers", "0", "--export", "false",
        "--max_steps", "3", "--debug_nan_steps", "1",
    ])  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    nan_steps = [r["step"] for r in rows if not math.isfinite(r["loss"])]
    assert len(nan_steps) == 1
    assert f"step {nan_steps[0]}: non-finite loss or grad norm, update skipped" in capsys.readouterr().out
