"""bench/models.py on a CPU: the quick run of the tiny presets writes the expected rows.

Proves: `python bench/models.py --quick` times a tokenizer stage-1 step, a DiT^DH step (with
FLOPs from FlopCounterMode and an MFU against the measured matmul rate), AutoGuidance sampling
and PIL / DALI data loading, writes JSON + markdown with those rows, and compares them with the
newest earlier result of the same device; with no time budget left it starts no row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import models as model_bench  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Compare only with the planted earlier result, not with what bench/results/ holds.
    patch = pytest.MonkeyPatch()
    patch.setattr(model_bench.common, "RESULTS_DIR", out)
    tag = model_bench.device_tag(torch.device("cpu"))
    earlier = {
        "meta": {"environment": {"time": "2000-01-01T00:00:00"}},
        "rows": [
            {
                "part": "train",
                "model": "DiT^DH dit-dh-tiny (cached latents)",
                "mode": "eager",
                "images_per_s": 2.0,
            }
        ],
    }
    (out / f"models-2000-01-01-{tag}.json").write_text(json.dumps(earlier))
    try:
        path = model_bench.main(
            ["--quick", "--device", "cpu", "--modes", "eager", "--data-images", "96", "--out", str(out)]
        )
    finally:
        patch.undo()
    return path, json.loads(path.with_suffix(".json").read_text())


def test_quick_cpu_run_writes_every_row(quick_run):
    md_path, result = quick_run
    rows = {(r["part"], r["mode"], r["model"].split()[0]): r for r in result["rows"]}
    for key in [
        ("train", "eager", "tokenizer"),
        ("train", "eager", "DiT^DH"),
        ("sample", "eager", "dit-dh-tiny"),
    ]:
        row = rows[key]
        assert row["images_per_s"] > 0 and row["ms"] > 0, row
    for name in ("tokenizer", "DiT^DH"):
        row = rows[("train", "eager", name)]
        assert row["GFLOP_per_image"] > 0.01 and 0 < row["MFU_%"] < 100, row
        assert row["TFLOPs"] == pytest.approx(row["GFLOP_per_image"] * row["images_per_s"] / 1e3, rel=1e-6)
    pil = rows[("data", "pil", "96")]
    assert pil["images_per_s"] > 0
    assert ("data", "dali", "96") in rows  # timed, or skipped with the reason
    assert not any(r["mode"] in ("ours", "compile+ours") for r in result["rows"])  # Triton rows need a GPU

    dit = rows[("train", "eager", "DiT^DH")]
    assert dit["vs_prev"] == pytest.approx(dit["images_per_s"] / 2.0)
    assert result["meta"]["previous"].endswith(
        "models-2000-01-01-" + model_bench.device_tag(torch.device("cpu")) + ".json"
    )

    md = md_path.read_text()
    assert "| part | model | mode |" in md and md.count("\n| train |") == 2 and "| sample |" in md
    assert "CPU run" in md and "MFU" in md


def test_spent_budget_starts_no_row(tmp_path):
    path = model_bench.main(
        [
            "--device",
            "cpu",
            "--modes",
            "eager",
            "--parts",
            "train",
            "sample",
            "--budget-s",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 3 and all(r["note"] == "skipped: time budget spent" for r in rows)
    assert "previous" in json.loads(path.with_suffix(".json").read_text())["meta"]


def test_triton_modes_are_refused_on_cpu(tmp_path):
    with pytest.raises(SystemExit):
        model_bench.main(["--device", "cpu", "--modes", "ours", "--out", str(tmp_path)])
