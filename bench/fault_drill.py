"""Fault drill: train.py as a demanding user breaks it, with real processes and real kill -9.

    python bench/fault_drill.py                 # the full drill, ~10 min on 2 CPU cores
    python bench/fault_drill.py --kills 2 --in_save 1 --steps 30 --quick    # a smoke run

What it does (tiny tokenizer on the demo images, checkpoint every --ckpt_every steps):
1. Kills: one uninterrupted reference run, then the same run killed with SIGKILL --kills times,
   --in_save of them inside checkpoint writes (half of those after part of the bytes, the rest
   after all bytes but before the rename, one inside the manifest write), the others at random
   moments; each followed by `--resume auto`. Reports the steps lost per kill and whether the
   per-step losses (metrics.jsonl), final weights and EMA equal the reference bit for bit.
2. Damaged checkpoints on copies of the finished run: flipped bytes, truncated, zero bytes, a
   pickle that runs code on load (with a manifest entry forged to match), `latest` naming a
   missing file, an explicit damaged file, every checkpoint damaged. Each must be detected.
3. Bad input: unreadable training and held-out images, NaN losses, bad configurations.
4. The machine: a full disk and a read-only disk (a small tmpfs when this process may mount one,
   else the same OS errors injected into the writes; the report says which).

Every process's stderr is searched for "Traceback": the figure to keep at zero. Results go to
bench/results/fault-drill-<date>-<machine>.{json,md}. Nothing here is a pytest test: its smoke
run is tests/test_fault_drill.py (in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import RESULTS_DIR  # noqa: E402
from rectok.checkpoints import store  # noqa: E402
from rectok.environment import environment  # noqa: E402

# Runs train.py as __main__ after arming an optional kill inside a checkpoint write:
# DRILL_KILL="<target name>:<n>:<mode>" kills this process with SIGKILL during the n-th atomic write
# whose target name starts with <target name> (ckpt_ or manifest.json); mode "mid" after half of the
# bytes, "rename" after all of them, before the rename. DRILL_FAULT="ENOSPC"/"EROFS" makes the n-th
# such write fail with that OS error instead (used when no tmpfs can be mounted).
WRAPPER = r"""
import errno, os, runpy, signal, sys
spec = os.environ.get("DRILL_KILL") or os.environ.get("DRILL_FAULT_AT")
if spec:
    from rectok.checkpoints import store
    prefix, nth, mode = spec.split(":")
    real, seen = store.atomic_write, []
    def atomic_write(path, write):
        if not os.path.basename(str(path)).startswith(prefix):
            return real(path, write)
        seen.append(path)
        if len(seen) != int(nth):
            return real(path, write)
        fault = os.environ.get("DRILL_FAULT")
        def dying(f):
            class Half:
                def __init__(self):
                    self.n = 0
                def write(self, b):
                    self.n += len(b)
                    f.write(b)
                    if mode == "mid" and self.n > 4096:
                        if fault:
                            raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)))
                        f.flush(); os.fsync(f.fileno()); os.kill(os.getpid(), signal.SIGKILL)
                    return len(b)
                def __getattr__(self, name):
                    return getattr(f, name)
            write(Half())
            f.flush(); os.fsync(f.fileno())
            if fault:
                raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, dying)
    store.atomic_write = atomic_write
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["DRILL_ROOT"], "train.py"), run_name="__main__")
"""


@dataclass
class Proc:
    """One train.py process of the drill."""

    what: str
    rc: int | None
    killed: bool
    traceback: bool
    error_lines: list[str]
    resumed_at: int | None
    last_step: int | None
    wall_s: float
    first_row_s: float | None = None  # seconds from start to its first metrics row
    stderr_tail: str = ""


@dataclass
class Report:
    env: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    kills: list[dict] = field(default_factory=list)
    kill_summary: dict = field(default_factory=dict)
    damaged: list[dict] = field(default_factory=list)
    bad_input: list[dict] = field(default_factory=list)
    machine: list[dict] = field(default_factory=list)
    verification: dict = field(default_factory=dict)
    tracebacks: list[str] = field(default_factory=list)


def last_metrics_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip().endswith("}")]
    return steps[-1] if steps else None


def launch(
    what: str,
    args: list[str],
    *,
    env: dict | None = None,
    kill_after: float | None = None,
    run_dir: Path | None = None,
    timeout: float = 600,
) -> Proc:
    """Run train.py (through WRAPPER) with `args`; SIGKILL it `kill_after` seconds after its start
    (random-moment kills), or let it finish. Records when its first metrics row appeared."""
    extra = {"DRILL_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full_env = {**os.environ, **extra, **(env or {})}
    t0 = time.perf_counter()
    start_step, first_row_s = (last_metrics_step(run_dir) if run_dir else None), None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], stdout=out, stderr=err, env=full_env)
        killed = False
        while p.poll() is None:
            now = time.perf_counter() - t0
            if (
                first_row_s is None
                and run_dir is not None
                and last_metrics_step(run_dir) not in (None, start_step)
            ):
                first_row_s = now
            if kill_after is not None and now >= kill_after:
                p.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    killed = killed or p.returncode == -signal.SIGKILL
    print(f"  {what}: exit {p.returncode}{' (SIGKILL)' if killed else ''}", flush=True)
    resumed = re.search(r"resumed from \S+ at step (\d+)", stdout)
    return Proc(
        what=what,
        rc=p.returncode,
        killed=killed,
        traceback="Traceback" in stderr,
        # Our one-line errors (maybe behind a progress bar's carriage return) and argparse's.
        error_lines=[x for x in re.split(r"[\r\n]", stderr) if x.startswith("ERROR:") or ": error: " in x],
        resumed_at=int(resumed.group(1)) if resumed else None,
        last_step=last_metrics_step(run_dir) if run_dir else None,
        first_row_s=first_row_s,
        wall_s=round(time.perf_counter() - t0, 2),
        stderr_tail=stderr[-1500:] if "Traceback" in stderr or (p.returncode and not killed) else "",
    )


def train_args(data: Path, run_dir: Path, steps: int, ckpt_every: int, *extra: str) -> list[str]:
    return [
        "--data.path", str(data), "--run_dir", str(run_dir), "--max_steps", str(steps),
        "--global_batch", "4", "--micro_batch", "4", "--log_every", "1", "--image_every", "0",
        "--ckpt_every", str(ckpt_every), "--keep_last", "3", "--tensorboard", "false",
        "--data.eval_images", "4", "--data.num_workers", "0", "--export", "false", "--epochs", "10000",
        *extra,
    ]  # fmt: skip


def same_run(a: Path, b: Path) -> dict:
    """Per-step losses and the final model / EMA of two runs, compared exactly."""

    def rows(run_dir: Path) -> list[tuple[int, float]]:
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        ]

    def weights(state: dict) -> dict[str, torch.Tensor]:
        return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"]["params"].items()}}

    la, lb = rows(a), rows(b)
    sa, sb = store.load_checkpoint(a), store.load_checkpoint(b)
    wa, wb = weights(sa), weights(sb)
    return {
        "steps_compared": len(la),
        "losses_identical": la == lb,
        "duplicate_rows": len(lb) - len({s for s, _ in lb}),
        "weights_identical": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
    }


# ----------------------------------------------------------------------------------------- 1. kills
def drill_kills(
    rep: Report, data: Path, work: Path, steps: int, ckpt_every: int, kills: int, in_save: int, seed: int
) -> None:
    rng = random.Random(seed)
    ref = work / "reference"
    p = launch("reference", train_args(data, ref, steps, ckpt_every), run_dir=ref)
    rep.tracebacks += [p.stderr_tail] if p.traceback else []
    startup_s = p.first_row_s or 5.0
    per_step_s = max(p.wall_s - startup_s, 0.1) / steps
    run = work / "killed"
    args = train_args(data, run, steps, ckpt_every, "--resume", "auto")
    # In-save kills: checkpoint writes 1..n; vary mid-write / before rename; one in the manifest.
    plan = []
    for i in range(kills):
        if i < in_save:
            if i == in_save - 1 and in_save > 1:  # the manifest is small: killed before its rename
                plan.append(("in-save", store.MANIFEST, "rename"))
            else:
                plan.append(("in-save", store.PREFIX, "mid" if i % 2 == 0 else "rename"))
        else:
            plan.append(("random", None, None))
    rng.shuffle(plan)
    done = False
    for i, (kind, target, mode) in enumerate(plan):
        before = last_metrics_step(run) or 0
        if before >= steps:
            done = True
            break
        if kind == "in-save":
            env = {"DRILL_KILL": f"{target}:1:{mode}"}  # the first such write of this process
            p = launch(f"kill {i + 1}: inside {target} write ({mode})", args, env=env, run_dir=run)
        else:  # anywhere from the middle of start-up to a few checkpoint intervals into training
            kill_after = rng.uniform(0.5 * startup_s, startup_s + 3 * ckpt_every * per_step_s)
            p = launch(f"kill {i + 1}: random ({kill_after:.1f} s)", args, kill_after=kill_after, run_dir=run)
        rep.tracebacks += [p.stderr_tail] if p.traceback else []
        rep.kills.append({**asdict(p), "kind": kind, "step_before": before})
    final = launch("final resume", args, run_dir=run)
    rep.tracebacks += [final.stderr_tail] if final.traceback else []
    # Steps lost by each kill: the last step it logged minus the step the next process resumed at.
    resumes = [k["resumed_at"] for k in rep.kills[1:]] + [final.resumed_at]
    for k, resumed in zip(rep.kills, resumes):
        k["resumed_next_at"] = resumed
        k["steps_lost"] = None if resumed is None or k["last_step"] is None else k["last_step"] - resumed
    lost = [k["steps_lost"] for k in rep.kills if k["steps_lost"] is not None]
    killed = [k for k in rep.kills if k["killed"]]
    rep.kill_summary = {
        "trials": len(rep.kills),
        "killed_by_sigkill": len(killed),
        "inside_checkpoint_writes": sum(k["kind"] == "in-save" for k in killed),
        "survived": final.rc == 0 and sum(k["traceback"] for k in rep.kills) == 0,
        "finished_early": done,
        "steps_lost_max": max(lost, default=0),
        "steps_lost_mean": round(sum(lost) / len(lost), 2) if lost else 0,
        "ckpt_every": ckpt_every,
        "temp_files_left": sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")),
        **same_run(ref, run),
    }


# ----------------------------------------------------------------------------- 2. damaged checkpoints
def _flip(path: Path, count: int = 256, seed: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    for i in random.Random(seed).sample(range(len(raw) // 4, len(raw)), count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _forge_manifest(path: Path) -> None:
    """The manifest entry an attacker with write access would forge so that size + sha256 pass."""
    manifest = store.read_manifest(path.parent)
    manifest[path.name] = {
        **manifest.get(path.name, {}),
        "sha256": store.sha256(path),
        "bytes": path.stat().st_size,
    }
    (path.parent / store.MANIFEST).write_text(json.dumps(manifest))


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def drill_damaged(rep: Report, data: Path, work: Path, steps: int, ckpt_every: int) -> None:
    src = work / "reference"
    ckpts = store.list_checkpoints(src)
    if len(ckpts) < 2:
        return
    newest, older = ckpts[-1].name, ckpts[-2].name
    older_step = int(older[len(store.PREFIX) : -len(store.SUFFIX)])
    cases = [
        "flipped 256 bytes",
        "truncated",
        "zero bytes",
        "code-running pickle, manifest forged",
        "latest names a missing file",
        "explicit damaged file",
        "all checkpoints damaged",
    ]
    for case in cases:
        run = work / f"damaged-{len(rep.damaged)}"
        shutil.copytree(src, run)
        marker = run / "PAYLOAD_RAN"
        target = run / newest
        explicit = None
        expect_resume: int | None = older_step
        if case == "flipped 256 bytes":
            _flip(target)
        elif case == "truncated":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        elif case == "zero bytes":
            target.write_bytes(b"")
        elif case.startswith("code-running"):
            torch.save({"model": Payload(str(marker))}, target)
            _forge_manifest(target)
        elif case.startswith("latest names"):
            target.unlink()
            (run / store.LATEST).write_text("ckpt_999999999.pt\n")
        elif case == "explicit damaged file":
            _flip(target)
            explicit, expect_resume = str(target), None
        else:
            for p in store.list_checkpoints(run):
                _flip(p)
            expect_resume = None
        resume = explicit or "auto"
        p = launch(case, train_args(data, run, steps + 1, ckpt_every, "--resume", resume), run_dir=run)
        rep.tracebacks += [p.stderr_tail] if p.traceback else []
        detected = (
            (p.resumed_at == expect_resume)
            if expect_resume is not None
            else (p.rc == 2 and bool(p.error_lines))
        )
        rep.damaged.append(
            {
                "case": case,
                "rc": p.rc,
                "resumed_at": p.resumed_at,
                "expected_resume": expect_resume,
                "detected": detected and not marker.exists(),
                "payload_ran": marker.exists(),
                "error": p.error_lines[:1],
                "traceback": p.traceback,
            }
        )


# ----------------------------------------------------------------------------------- 3. bad input
BAD_CONFIGS = [
    ("--optim.lr", "inf"),
    ("--optim.lr", "nan"),
    ("--optim.lr", "-1"),
    ("--epochs", "inf"),
    ("--micro_batch", "0"),
    ("--global_batch", "0"),
    ("--global_batch", "6"),
    ("--seed", "-1"),
    ("--seed", str(2**70)),
    ("--preset", "rectok-Q"),
    ("--stage", "pretrain"),
    ("--precision", "fp8"),
    ("--ckpt_verify", "sometimes"),
    ("--no_such_key", "1"),
    ("--max_steps", "-5"),
    ("--optim.ema_decay", "1.5"),
    ("--data.path", "/nonexistent/imagenet"),
    ("--resume", "/nonexistent/ckpt.pt"),
    ("--config", "/nonexistent/config.json"),
    ("--run_dir", "FILE/sub"),
    ("--tok.teacher_targets", "fancy"),
]


def drill_bad_input(rep: Report, data: Path, work: Path) -> None:
    # Unreadable images: two training files truncated, one held-out file not an image.
    bad_data = work / "bad_data"
    shutil.copytree(data, bad_data)
    train_files = sorted((bad_data / "train").rglob("*.JPEG"))
    for f in train_files[:2]:
        f.write_bytes(f.read_bytes()[:150])
    next(iter(sorted((bad_data / "val").rglob("*.JPEG")))).write_text("not an image")
    run = work / "bad-images"
    p = launch("unreadable images", train_args(bad_data, run, 6, 3, "--data.eval_images", "8"), run_dir=run)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    rep.bad_input.append(
        {
            "case": "2 truncated training images, 1 garbage held-out image",
            "rc": p.rc,
            "counted": {k: metrics.get(k) for k in ("skipped_images", "heldout_images", "heldout_skipped")},
            "ok": p.rc == 0 and metrics.get("heldout_skipped") == 1 and metrics.get("skipped_images", 0) >= 1,
            "traceback": p.traceback,
        }
    )
    # NaN: one poisoned step is skipped and counted; three in a row with --max_nonfinite 2 stop the run.
    run = work / "nan-once"
    p = launch("one NaN step", train_args(data, run, 4, 0, "--debug_nan_steps", "2"), run_dir=run)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    rep.bad_input.append(
        {
            "case": "one NaN step",
            "rc": p.rc,
            "nonfinite_steps": metrics.get("nonfinite_steps"),
            "ok": p.rc == 0 and metrics.get("nonfinite_steps") == 1,
            "traceback": p.traceback,
        }
    )
    run = work / "nan-streak"
    p = launch(
        "NaN streak",
        train_args(data, run, 8, 0, "--debug_nan_steps", "2,3,4", "--max_nonfinite", "2"),
        run_dir=run,
    )
    rep.bad_input.append(
        {
            "case": "3 NaN steps in a row, --max_nonfinite 2",
            "rc": p.rc,
            "error": p.error_lines[:1],
            "ok": p.rc == 3 and bool(p.error_lines),
            "traceback": p.traceback,
        }
    )
    rep.tracebacks += [p.stderr_tail] if p.traceback else []
    # Bad configurations: one ERROR line each, exit 2 or 4, no run folder written.
    blocker = work / "FILE"
    blocker.write_text("a file where a folder is expected")
    for key, value in BAD_CONFIGS:
        run = work / f"cfg-{len(rep.bad_input)}"
        value = value.replace("FILE", str(blocker))
        args = [*train_args(data, run, 2, 0), key, value]
        p = launch(f"{key} {value}", args)
        untouched = not run.exists() or not any(run.iterdir())
        rep.bad_input.append(
            {
                "case": f"{key} {value}",
                "rc": p.rc,
                "error": p.error_lines[:1],
                "run_dir_untouched": untouched,
                "ok": p.rc in (2, 4) and len(p.error_lines) >= 1 and not p.traceback and untouched,
                "traceback": p.traceback,
            }
        )
        rep.tracebacks += [p.stderr_tail] if p.traceback else []


# ----------------------------------------------------------------------------------- 4. the machine
def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _remount(path: Path, opts: str) -> bool:
    r = subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], capture_output=True, timeout=10)
    return r.returncode == 0


def drill_machine(rep: Report, data: Path, work: Path, ckpt_every: int) -> None:
    probe = work / "ckpt_size"
    p = launch("checkpoint size probe", train_args(data, probe, 1, 0), run_dir=probe)
    ckpt_mb = store.latest_checkpoint(probe).stat().st_size / 2**20
    mnt = work / "small_disk"
    real = _mount_tmpfs(mnt, int(ckpt_mb * 2.5) + 1)  # room for two checkpoints and the run's small files
    try:
        run = mnt / "run"
        if real:
            args = train_args(data, run, 6 * ckpt_every, ckpt_every)
            full = launch("full disk", args, run_dir=run)
        else:
            args = train_args(data, run, 6 * ckpt_every, ckpt_every)
            full = launch(
                "full disk (injected ENOSPC)",
                args,
                run_dir=run,
                env={"DRILL_FAULT_AT": f"{store.PREFIX}:3:mid", "DRILL_FAULT": "ENOSPC"},
            )
        kept = store.list_checkpoints(run)
        intact = bool(kept) and all(store.verify_checkpoint(p) for p in kept)
        if real:
            _remount(mnt, f"size={int(ckpt_mb * 8) + 1}m")  # the user frees space
        resumed = launch("resume after space was freed", [*args, "--resume", "auto"], run_dir=run)
        rep.machine.append(
            {
                "case": "full disk" + ("" if real else " (injected ENOSPC: no tmpfs could be mounted)"),
                "rc": full.rc,
                "error": full.error_lines[:1],
                "checkpoints_left_intact": intact,
                "temp_files_left": sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")),
                "resumed_at": resumed.resumed_at,
                "resume_rc": resumed.rc,
                "ok": full.rc == 4 and intact and resumed.rc == 0 and not full.traceback,
                "traceback": full.traceback or resumed.traceback,
            }
        )
        rep.tracebacks += [x.stderr_tail for x in (full, resumed) if x.traceback]
        # Read-only: the run folder's disk is remounted read-only, then the run is resumed.
        if real and _remount(mnt, "ro"):
            ro = launch(
                "read-only disk", [*args, "--max_steps", str(8 * ckpt_every), "--resume", "auto"], run_dir=run
            )
            case = "read-only disk"
        else:
            ro = launch(
                "read-only disk (injected EROFS)",
                [*args, "--max_steps", str(8 * ckpt_every), "--resume", "auto"],
                run_dir=run,
                env={"DRILL_FAULT_AT": f"{store.PREFIX}:1:rename", "DRILL_FAULT": "EROFS"},
            )
            case = "read-only disk (injected EROFS: no tmpfs could be remounted)"
        rep.machine.append(
            {
                "case": case,
                "rc": ro.rc,
                "error": ro.error_lines[:1],
                "ok": ro.rc == 4 and bool(ro.error_lines) and not ro.traceback,
                "traceback": ro.traceback,
            }
        )
        rep.tracebacks += [ro.stderr_tail] if ro.traceback else []
    finally:
        if real:
            subprocess.run(["umount", str(mnt)], capture_output=True)
    del p


def verification_cost(rep: Report, work: Path) -> None:
    """What size + sha256 verification adds to a resume: measured on the drill's checkpoints and on
    a 256 MiB file, given per GiB (a rectok-B training checkpoint is a few GiB: scale linearly)."""
    ckpts = store.list_checkpoints(work / "reference")
    if ckpts:
        t0 = time.perf_counter()
        store.check_checkpoint(ckpts[-1], "full")
        rep.verification["tiny_checkpoint_mib"] = round(ckpts[-1].stat().st_size / 2**20, 1)
        rep.verification["tiny_checkpoint_s"] = round(time.perf_counter() - t0, 3)
    big = work / "quarter_gib.bin"
    with open(big, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(16 << 20))
    t0 = time.perf_counter()
    store.sha256(big)
    rep.verification["sha256_s_per_gib"] = round(4 * (time.perf_counter() - t0), 2)
    big.unlink()


# ----------------------------------------------------------------------------------------- report
def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _first(lines: list[str] | None, width: int = 160) -> str:
    return (lines or [""])[0][:width].replace("|", "/")


def markdown(rep: Report) -> str:
    ks, v = rep.kill_summary, rep.verification
    lines = [f"# Fault drill, {rep.env.get('time', '')[:10]} ({rep.config.get('machine')})", ""]
    lines += [f"Command: `{rep.config.get('command')}`", "", "## Kills (SIGKILL, then `--resume auto`)", ""]
    lines.append(
        _row(
            "trials",
            "killed",
            "inside checkpoint writes",
            "survived",
            "steps lost (max / mean)",
            "losses identical",
            "weights + EMA identical",
            "duplicate metric rows",
            "temp files left",
        )
    )
    lines.append(_row(*["---"] * 9))
    lines.append(
        _row(
            ks.get("trials"),
            ks.get("killed_by_sigkill"),
            ks.get("inside_checkpoint_writes"),
            ks.get("survived"),
            f"{ks.get('steps_lost_max')} / {ks.get('steps_lost_mean')} (ckpt_every {ks.get('ckpt_every')})",
            f"{ks.get('losses_identical')} ({ks.get('steps_compared')} steps)",
            ks.get("weights_identical"),
            ks.get("duplicate_rows"),
            len(ks.get("temp_files_left", [])),
        )
    )
    lines += [
        "",
        _row("kill", "step before", "last step logged", "resumed next at", "steps lost"),
        _row(*["---"] * 5),
    ]
    lines += [
        _row(k["what"], k["step_before"], k["last_step"], k["resumed_next_at"], k["steps_lost"])
        for k in rep.kills
    ]
    lines += ["", "## Damaged checkpoints", ""]
    lines += [_row("case", "detected", "resumed at (expected)", "exit", "message"), _row(*["---"] * 5)]
    lines += [
        _row(
            d["case"],
            d["detected"],
            f"{d['resumed_at']} ({d['expected_resume']})",
            d["rc"],
            _first(d["error"]),
        )
        for d in rep.damaged
    ]
    lines += [
        "",
        "## Bad input",
        "",
        _row("case", "handled", "exit", "message or counts"),
        _row(*["---"] * 4),
    ]
    for b in rep.bad_input:
        detail = _first(b.get("error")) or json.dumps(b.get("counted") or b.get("nonfinite_steps"))
        lines.append(_row(f"`{b['case']}`", b["ok"], b["rc"], detail))
    lines += ["", "## The machine", "", _row("case", "handled", "exit", "message"), _row(*["---"] * 4)]
    lines += [_row(m["case"], m["ok"], m["rc"], _first(m["error"], 220)) for m in rep.machine]
    lines += ["", "## Verification cost", ""]
    lines.append(
        f"sha256 of the tiny checkpoint ({v.get('tiny_checkpoint_mib')} MiB): "
        f"{v.get('tiny_checkpoint_s')} s; "
        f"per GiB on this machine: {v.get('sha256_s_per_gib')} s (`--ckpt_verify size` skips it)."
    )
    lines += ["", f"## Tracebacks: {len(rep.tracebacks)}", ""] + [f"```\n{t}\n```" for t in rep.tracebacks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=16)
    ap.add_argument("--in_save", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ckpt_every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="kills only (the smoke test)")
    ap.add_argument("--work", default="", help="scratch folder (default: a temp folder, removed)")
    ap.add_argument(
        "--out", default=str(RESULTS_DIR), help="folder for the JSON + markdown results ('' = none)"
    )
    a = ap.parse_args(argv)
    rep = Report(env=environment())
    rep.config = {
        **vars(a),
        "machine": f"CPU, {os.cpu_count()} cores",
        "command": "python bench/fault_drill.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="rectok-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from rectok.data.demo import ensure_demo_dataset

        data = ensure_demo_dataset(
            work / "data", train_per_class=1, val_per_class=1, min_size=64, max_size=80
        )
        t0 = time.perf_counter()
        drill_kills(rep, data, work, a.steps, a.ckpt_every, a.kills, a.in_save, a.seed)
        print(f"kills: {json.dumps(rep.kill_summary)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if not a.quick:
            drill_damaged(rep, data, work, a.steps, a.ckpt_every)
            print(
                f"damaged checkpoints: {sum(d['detected'] for d in rep.damaged)}/{len(rep.damaged)} detected",
                flush=True,
            )
            drill_bad_input(rep, data, work)
            print(
                f"bad input: {sum(b['ok'] for b in rep.bad_input)}/{len(rep.bad_input)} handled", flush=True
            )
            drill_machine(rep, data, work, a.ckpt_every)
            print(f"machine: {sum(m['ok'] for m in rep.machine)}/{len(rep.machine)} handled", flush=True)
        verification_cost(rep, work)
        print(f"tracebacks: {len(rep.tracebacks)}", flush=True)
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"fault-drill-{time.strftime('%Y-%m-%d')}-CPU" + ("-quick" if a.quick else "")
            (out / f"{stem}.json").write_text(json.dumps(asdict(rep), indent=2, default=str))
            (out / f"{stem}.md").write_text(markdown(rep))
            print(f"wrote {out / stem}.{{json,md}}")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return rep


if __name__ == "__main__":
    main()
