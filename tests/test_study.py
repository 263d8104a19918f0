"""Smoke test of the FSD study (`python -m rectok.study fsd --quick`, issue 12).

Proves, in one quick run (~30 s on 2 cores): the report files exist (markdown, a readable PNG, JSON);
the per-model table has exactly one row per model and tau, with a value for every seed; the teacher
is not the random one (its saved weights differ from Teacher.tiny's fresh initialisation, it loads
through `Teacher.tiny(FILE)` as train.py loads it, and its val accuracy is above chance even in quick
mode); the tokenizers really differ only in the ablated factor (each run's config.json: no-fsd has
tok.semantic_flow false, align-only / recon-only restrict loss.semantic_tokens, everything else but
the run folder is identical within a seed) and they all distil the study's teacher. It asserts no
ordering of the accuracies: that is the study's measurement.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rectok.models.teacher import Teacher
from rectok.study.cli import main
from rectok.study.fsd import MODELS, QUICK, RUN_NAMES
from rectok.study.teacher import fresh_teacher


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "fsd"
    assert main(["fsd", "--quick", "--out", str(out)]) == 0
    return out


def test_report_files(study):
    for name in ("report.md", "probe.png", "results.json"):
        assert (study / name).is_file(), name
    with Image.open(study / "probe.png") as png:
        assert png.format == "PNG" and min(png.size) > 100
    text = (study / "report.md").read_text()
    assert "a small ViT trained here, not DINO" in text
    assert "python -m rectok.study fsd --quick" in text and "load average" in text


def test_one_row_per_model_and_tau(study):
    text = (study / "report.md").read_text()
    table = text.split("One row per model and tau")[1].split("\n\n")[1]  # the table after its caption
    rows = re.findall(r"^\| (FSD\+RAD|no-fsd|align-only|recon-only) \| ([\d.]+) \| ([\d.]+) \|", table, re.M)
    assert len(table.splitlines()) == 2 + len(rows)  # header, rule, then only model rows
    taus = [f"{t:g}" for t in QUICK["taus"]]
    assert sorted((m, t) for m, t, _ in rows) == sorted((m, t) for m in MODELS for t in taus)
    results = json.loads((study / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["label"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in MODELS for s in QUICK["seeds"]
    )
    for r in runs:
        assert sorted(r["probe"]["accuracy"]) == sorted(taus)
        assert all(0 <= a <= 1 for a in r["probe"]["accuracy"].values())


def test_teacher_is_trained_not_random(study):
    results = json.loads((study / "results.json").read_text())
    teacher = results["teacher"]
    path = Path(teacher["weights"])
    trained = load_file(str(path))
    fresh = fresh_teacher(teacher["training"]["seed"], 64, teacher["training"]["targets"]).model.state_dict()
    assert trained.keys() == fresh.keys()
    moved = [k for k in trained if not torch.allclose(trained[k], fresh[k])]
    assert len(moved) > len(trained) // 2, moved
    loaded = Teacher.tiny(path, image_size=64)
    assert not loaded.is_random and loaded.weights_source == str(path)
    assert teacher["val_accuracy_head"] > 1 / teacher["num_classes"], teacher  # above chance, quick mode too


def test_ablations_differ_only_in_their_factor(study):
    results = json.loads((study / "results.json").read_text())
    teacher_file = results["teacher"]["weights"]
    expected = {
        "FSD+RAD": (True, "all"),
        "no-fsd": (False, "all"),
        "align-only": (True, "visible"),
        "recon-only": (True, "masked"),
    }
    for seed in QUICK["seeds"]:
        configs = {
            label: json.loads((study / "runs" / f"{RUN_NAMES[label]}-s{seed}" / "config.json").read_text())
            for label in MODELS
        }
        for label, cfg in configs.items():
            assert (cfg["tok"]["semantic_flow"], cfg["loss"]["semantic_tokens"]) == expected[label], label
            assert cfg["ablation"] == MODELS[label] and cfg["seed"] == seed
            assert cfg["tok"]["teacher"] == "tiny" and cfg["tok"]["teacher_weights"] == teacher_file
            assert cfg["loss"]["perceptual"] == 0 and cfg["loss"]["gan"] == 0
        base = _flat(configs["FSD+RAD"])
        for label, cfg in configs.items():
            changed = {k for k, v in _flat(cfg).items() if base[k] != v}
            factor = {"no-fsd": {"tok.semantic_flow"}, "align-only": {"loss.semantic_tokens"},
                      "recon-only": {"loss.semantic_tokens"}}.get(label, set())  # fmt: skip
            assert changed == factor | ({"run_dir", "ablation"} if label != "FSD+RAD" else set()), label


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
