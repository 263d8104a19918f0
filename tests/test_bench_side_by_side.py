"""bench/side_by_side.py and its timing machinery (bench/interleave.py).

Proves, without the official release (CI has none):
- interleaved rounds rank a slower variant below a faster one (ratio = median(official) /
  median(ours) > 1 when ours is faster, in every round), rotate the order every round, keep a
  round during which other processes used the CPU apart and run another in its place, fall back
  to all rounds (flagged) when none is quiet, and batch calls so that a round lasts min_round_s;
- the profiler summary counts host syncs (aten::_local_scalar_dense) per call, tells the ops inside
  the optimizer's step from the model's, and reports the op-count difference to the official variant;
- the CLI refuses a missing folder, a folder that is not a release checkout, and a Python without
  the release's extra dependencies, each with one line and no traceback.
With RECTOK_OFFICIAL pointing at a release checkout (and transformers + torchdiffeq importable), a
real side-by-side run of the dit item checks equality to 1e-4 and writes its JSON and markdown.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import interleave  # noqa: E402
import side_by_side  # noqa: E402

SLOW_S, FAST_S = 0.008, 0.002


def sleeper(log: list[str], name: str, seconds: float):
    def call() -> None:
        log.append(name)
        time.sleep(seconds)  # no CPU use: never counted as another process's load

    return call


class ScriptedMeter:
    """Stands in for ForeignCPU: the n-th round 'sees' readings[n] cores of other processes."""

    def __init__(self, readings: list[float]) -> None:
        self.readings = iter(readings)

    def __call__(self) -> ScriptedMeter:
        return self

    def cores(self) -> float:
        return next(self.readings)


def test_interleaved_rounds_rank_the_slower_variant_and_rotate_the_order():
    log: list[str] = []
    variants = {"official": sleeper(log, "official", SLOW_S), "ours": sleeper(log, "ours", FAST_S)}
    rounds = interleave.time_interleaved(variants, 4, warmup=1, quiet_cores=math.inf, min_round_s=0.0)
    assert rounds.calls_per_round == 1
    assert rounds.orders == [["official", "ours"], ["ours", "official"]] * 2
    assert log == ["official", "ours"] + [name for order in rounds.orders for name in order]  # warm-up first

    summary = interleave.summarize(rounds)
    ours, official = summary["variants"]["ours"], summary["variants"]["official"]
    assert summary["rounds_quiet"] == official["rounds"] == ours["rounds"] == 4
    assert summary["rounds_contended"] == 0 and summary["warning"] is None
    assert summary["first_in_round"] == ["official", "ours", "official", "ours"]
    assert official["median_ms"] >= 1e3 * SLOW_S > 1e3 * FAST_S <= ours["median_ms"]
    assert ours["ratio"] == pytest.approx(official["median_ms"] / ours["median_ms"])
    assert ours["ratio"] > 1.5 and ours["ratio_round_min"] > 1.0  # ours is faster in every round
    assert ours["ratio_round_min"] <= ours["ratio_round_median"] <= ours["ratio_round_max"]
    assert "ratio" not in official


def test_contended_rounds_are_kept_apart_and_replaced():
    variants = {"official": sleeper([], "official", FAST_S), "ours": sleeper([], "ours", FAST_S)}
    meter = ScriptedMeter([0.0, 1.5, 0.1, 0.0, 0.0])
    rounds = interleave.time_interleaved(variants, 4, warmup=0, quiet_cores=0.5, min_round_s=0.0, meter=meter)
    assert len(rounds.orders) == 5  # four quiet rounds and the contended one
    assert rounds.foreign_contended == [1.5] and rounds.foreign_clean == [0.0, 0.1, 0.0, 0.0]
    assert all(len(rounds.clean[n]) == 4 and len(rounds.contended[n]) == 1 for n in variants)
    assert [o[0] for o in rounds.orders] == ["official", "ours", "official", "ours", "official"]
    summary = interleave.summarize(rounds)
    assert summary["rounds_run"] == 5 and summary["rounds_contended"] == 1
    assert summary["foreign_cores_contended"] == [1.5] and summary["foreign_cores_quiet_max"] == 0.1


def test_a_machine_that_never_gets_quiet_gives_flagged_figures_from_all_rounds():
    variants = {"official": sleeper([], "official", FAST_S), "ours": sleeper([], "ours", FAST_S)}
    rounds = interleave.time_interleaved(
        variants, 3, warmup=0, quiet_cores=0.5, max_extra_rounds=1, min_round_s=0.0,
        meter=ScriptedMeter([2.0] * 4),
    )  # fmt: skip
    assert len(rounds.orders) == 4 and not rounds.foreign_clean
    assert rounds.warning and all(len(rounds.clean[n]) == 4 for n in variants)


def test_short_calls_are_batched_into_rounds_of_min_round_s():
    variants = {"official": sleeper([], "official", SLOW_S), "ours": sleeper([], "ours", FAST_S)}
    rounds = interleave.time_interleaved(variants, 2, warmup=1, min_round_s=0.04)
    assert rounds.calls_per_round >= math.ceil(0.04 / (SLOW_S + FAST_S + 0.005))
    summary = interleave.summarize(rounds)
    # per-call times, not per-round sums
    assert (
        summary["variants"]["ours"]["median_ms"] < 1e3 * SLOW_S < summary["variants"]["official"]["median_ms"]
    )


def test_profile_counts_host_syncs_and_differences_to_official():
    a = torch.randn(64)
    variants = {"official": lambda: (a + 1).sum().item(), "ours": lambda: (a + 1).sum()}
    profiles = interleave.profile_ops(variants, calls=2)
    assert profiles["official"]["host_syncs"] == 1 and profiles["ours"]["host_syncs"] == 0
    assert profiles["ours"]["op_counts"]["aten::add"] == 1 and not profiles["ours"]["has_optimizer"]
    diffs = interleave.op_differences(profiles)
    assert ("aten::_local_scalar_dense", -1.0) in diffs["ours"]["op_counts"]
    assert all("_self_ms" not in p for p in profiles.values())


def test_profile_tells_the_optimizers_ops_from_the_models():
    w = torch.nn.Parameter(torch.ones(8))
    opt = torch.optim.AdamW([w], lr=1e-3)  # on a CPU: one .item() of the step count per parameter

    def step() -> None:
        (w * 2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    [prof] = interleave.profile_ops({"official": step}, calls=2).values()
    assert prof["has_optimizer"] and prof["host_syncs"] >= 1 and prof["model"]["host_syncs"] == 0
    assert prof["model_op_counts"]["aten::mul"] >= 1 and 0 < prof["model"]["aten_ops"] < prof["aten_ops"]


def _exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        side_by_side.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("side_by_side: ") and "\n" not in message
    return message


def test_cli_says_in_one_line_when_the_official_checkout_is_missing_or_wrong(tmp_path):
    assert "no such folder" in _exit_message(["--official", str(tmp_path / "nowhere")])
    message = _exit_message(["--official", str(tmp_path)])
    assert "not a RecTok release checkout" in message and "models/rectok.py" in message


def test_cli_names_the_missing_release_dependencies(tmp_path, monkeypatch):
    for name in side_by_side.RELEASE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        side_by_side.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchdiffeq" else real(name, *a),
    )
    message = _exit_message(["--official", str(tmp_path)])
    assert "torchdiffeq" in message and "pip install --target DIR transformers==4.56.1 torchdiffeq" in message


def _release_available() -> bool:
    path = os.environ.get("RECTOK_OFFICIAL")
    deps = all(importlib.util.find_spec(n) is not None for n in side_by_side.RELEASE_DEPS)
    return bool(path) and deps and side_by_side.release_problem(path) is None


@pytest.mark.slow
@pytest.mark.skipif(not _release_available(), reason="set RECTOK_OFFICIAL to a release checkout (+ its deps)")
def test_side_by_side_against_the_release(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "side_by_side.py"),
        "--official",
        os.environ["RECTOK_OFFICIAL"],
    ]
    cmd += ["--items", "dit", "--rounds", "2", "--warmup", "1", "--no-compile", "--profile", "--lock", ""]
    cmd += ["--wait-quiet", "0", "--min-round-s", "0", "--out", str(tmp_path)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [json_path] = tmp_path.glob("side-by-side-*-cpu.json")
    [item] = json.loads(json_path.read_text())["items"]
    assert item["status"] == "timed"
    assert {"forward", "train_loss", "grads"} <= set(item["checks"])
    assert all(v <= 1e-4 for v in item["checks"].values())
    variants = item["timing"]["variants"]
    assert set(variants) == {"official", "ours"} and variants["ours"]["ratio"] > 0
    assert variants["ours"]["rounds"] >= 2
    assert {"host_syncs", "copies", "casts"} <= set(item["profile"]["variants"]["ours"])
    assert "| dit |" in json_path.with_suffix(".md").read_text()
