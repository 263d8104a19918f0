"""bench/scaling.py (time vs batch and resolution, PNG) and bench/perceptual.py (the perceptual
loss's speed settings), run small.

Proves: the scaling sweep covers both axes of every row (the base point on both), writes JSON,
markdown and a PNG with one row per point, and refuses an unknown row; the perceptual benchmark
runs every setting, each one's loss agrees with the release setting (fp32 NCHW) within its
tolerance, and its table lands in markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import perceptual as perceptual_bench  # noqa: E402
import scaling  # noqa: E402


def test_sweeps_cover_batch_and_resolution():
    pts = scaling.points(quick=False)
    for work, (batches, base_px, sweep_batch) in scaling.SWEEPS.items():
        mine = [p for p in pts if p.work == work]
        assert sorted(p.batch for p in mine if "batch" in p.sweeps) == sorted(batches)
        assert sorted(p.px for p in mine if "px" in p.sweeps) == list(scaling.RESOLUTIONS)
        (base,) = [p for p in mine if p.base]  # the point on both curves
        assert (base.px, base.batch) == (base_px, sweep_batch)
        assert len({(p.px, p.batch) for p in mine}) == len(mine)  # nothing timed twice


def test_quick_scaling_writes_table_and_plot(tmp_path):
    rows = scaling.main(
        ["--quick", "--no-compile", "--works", "infer,sample", "--out", str(tmp_path), "--lock", ""]
    )
    assert [r["work"] for r in rows] == ["sample", "infer"]
    assert all(r["eager ms"] > 0 for r in rows)
    (json_path,) = tmp_path.glob("scaling-*.json")
    assert json.loads(json_path.read_text())["rows"] == rows
    assert json_path.with_suffix(".png").stat().st_size > 10_000
    assert "| sample | 64 | 2 |" in json_path.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        scaling.main(["--works", "train", "--out", str(tmp_path)])


def test_perceptual_settings_agree_with_the_release_setting(tmp_path):
    rows = perceptual_bench.main(["--quick", "--no-compile", "--out", str(tmp_path), "--device", "cpu"])
    assert [r["variant"] for r in rows] == [v for v in perceptual_bench.VARIANTS if "compiled" not in v]
    assert not any("error" in r for r in rows), rows
    by = {r["variant"]: r for r in rows}
    assert by["fp32"]["loss_rel_diff"] == 0.0
    assert by["fp32 channels_last"]["loss_rel_diff"] < 1e-4
    assert 0 < by["bf16"]["loss_rel_diff"] < 5e-2  # bf16 does round: a nonzero, bounded difference
    (md,) = tmp_path.glob("perceptual-*.md")
    assert "| bf16 channels_last |" in md.read_text()
