"""Smoke run of bench/fault_drill.py: a few real SIGKILLs (one inside a checkpoint write) of a
tiny training run, each resumed with --resume auto, must leave a run identical to an
uninterrupted one, with no temp files and no traceback. The full drill (damaged checkpoints, bad
input, full and read-only disks) is `python bench/fault_drill.py` (~10 min)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fault_drill  # noqa: E402


def test_kills_resume_to_an_identical_run(tmp_path):
    rep = fault_drill.main(
        ["--quick", "--kills", "2", "--in_save", "1", "--steps", "12", "--ckpt_every", "4",
         "--work", str(tmp_path), "--out", ""]
    )  # fmt: skip
    ks = rep.kill_summary
    assert ks["trials"] == 2 and ks["killed_by_sigkill"] >= 1 and ks["inside_checkpoint_writes"] == 1
    assert ks["survived"] and ks["losses_identical"] and ks["weights_identical"]
    assert ks["steps_compared"] == 12 and ks["duplicate_rows"] == 0 and ks["temp_files_left"] == []
    assert ks["steps_lost_max"] <= 4 and rep.tracebacks == []
