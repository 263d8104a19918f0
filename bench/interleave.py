"""Interleaved CPU timing of several variants of one computation on a shared machine.

Used by bench/side_by_side.py. On a CPU that other jobs share, two variants timed one after the
other see different background load; timed in rounds (one call batch of every variant per round,
the order rotating each round) they see the same load, and the per-round ratio of two variants
stays meaningful even when the absolute times drift. What this module adds around the rounds:

- `timing_lock`: an flock on a file that cooperating timing jobs hold while they time, so two
  of them never time at the same time;
- `ForeignCPU` / `wait_for_quiet`: how many cores *other* processes used over an interval, from
  /proc/stat (the whole machine) minus /proc/self/stat (this process and its threads);
- `time_interleaved`: the rounds; a round during which other processes used more cores than
  `quiet_cores` is kept apart (contended) and another round is run in its place;
- `summarize`: median / min / max per variant and the speed ratio to a baseline variant,
  median(baseline) / median(variant) (> 1: the variant is faster), with the spread of the
  per-round ratios;
- `profile_ops` / `op_differences`: torch.profiler op counts per call (host syncs, copies, casts)
  and the ops whose counts differ most from the baseline's.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The ops that tell where eager time goes besides the math. One aten::_local_scalar_dense runs per
# .item() / float() / bool() of a tensor: a host sync on a GPU, a dispatcher round trip on a CPU.
SYNC_OPS = ("aten::_local_scalar_dense",)
COPY_OPS = ("aten::copy_",)
CAST_OPS = ("aten::_to_copy",)  # .to(dtype) / .float() of a tensor that is not float32 already
CLONE_OPS = ("aten::clone", "aten::contiguous")
COUNTED = {"host_syncs": SYNC_OPS, "copies": COPY_OPS, "casts": CAST_OPS, "clones": CLONE_OPS}


# ----------------------------------------------------------------------------- the machine
def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def busy_processes(limit: int = 5, min_pcpu: float = 5.0) -> list[str]:
    """Other processes by CPU share (ps's %CPU is a lifetime average: good enough to name a job)."""
    try:
        lines = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[1:]
    except (OSError, subprocess.TimeoutExpired) as err:
        return [f"ps failed: {err}"]
    rows = []
    for line in lines:
        pid, pcpu, etime, args = (line.split(None, 3) + [""] * 4)[:4]
        if pid == str(os.getpid()) or args.startswith("ps "):
            continue
        if float(pcpu or 0) < min_pcpu or len(rows) >= limit:
            break
        rows.append(f"pid {pid} {pcpu}% cpu, up {etime}: {args[:90]}")
    return rows


def _cpu_ticks() -> tuple[int, int]:
    """(busy clock ticks of the whole machine, clock ticks of this process and its waited children)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait; steal counts as busy (the CPU was not ours)
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return busy, sum(int(x) for x in fields[11:15])  # utime stime cutime cstime


class ForeignCPU:
    """Cores used by other processes since this object was made."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self) -> None:
        self.t0, (self.busy0, self.mine0) = time.perf_counter(), _cpu_ticks()

    def cores(self) -> float:
        t, (busy, mine) = time.perf_counter(), _cpu_ticks()
        foreign = (busy - self.busy0) - (mine - self.mine0)
        return max(0.0, foreign) / self.HZ / max(t - self.t0, 1e-3)


def wait_for_quiet(limit_s: float, quiet_cores: float, window_s: float = 3.0) -> tuple[float, float]:
    """Sleep until other processes use < quiet_cores over window_s, or limit_s has passed.
    Returns (seconds waited, the last reading)."""
    start = last_note = time.perf_counter()
    while True:
        meter = ForeignCPU()
        time.sleep(window_s)
        cores = meter.cores()
        now = time.perf_counter()
        if cores < quiet_cores or now - start > limit_s:
            return now - start, cores
        if now - last_note >= 30 or now - start < 2 * window_s:  # say it once, then every 30 s
            print(f"    waiting for a quiet machine: other processes use {cores:.2f} cores", flush=True)
            last_note = now


@contextlib.contextmanager
def timing_lock(path: str | None) -> Iterator[float]:
    """Hold an exclusive flock on `path` (none if empty); yields the seconds waited for it."""
    if not path:
        yield 0.0
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        start = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - start
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- interleaved rounds
@dataclass
class Rounds:
    """Seconds per call of every variant, round by round (quiet rounds and contended ones apart)."""

    names: list[str]
    calls_per_round: int
    clean: dict[str, list[float]]
    contended: dict[str, list[float]]
    foreign_clean: list[float] = field(default_factory=list)  # other processes' cores per quiet round
    foreign_contended: list[float] = field(default_factory=list)
    orders: list[list[str]] = field(default_factory=list)  # the order of every round run, in turn
    warning: str | None = None


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 3,
    extra_warmup: dict[str, int] | None = None,
    quiet_cores: float = math.inf,
    max_extra_rounds: int | None = None,
    min_round_s: float = 0.5,
    meter: Callable[[], ForeignCPU] = ForeignCPU,
) -> Rounds:
    """Warm every variant up, then run rounds of `calls_per_round` calls of every variant (round k
    starts with variant k mod n) until `rounds` quiet rounds ran or the extra rounds are spent.

    calls_per_round is chosen so that a round lasts >= min_round_s: /proc/stat counts in clock
    ticks (10 ms), so a shorter window could not tell another job's load from rounding, and a
    per-round time of several calls is less noisy than one of a few milliseconds."""
    names = list(variants)
    extra_warmup = extra_warmup or {}
    last_call_s = {}
    for name in names:
        for _ in range(warmup + extra_warmup.get(name, 0)):
            start = time.perf_counter()
            variants[name]()
            last_call_s[name] = time.perf_counter() - start
    round_s = sum(last_call_s.values())
    calls = max(1, math.ceil(min_round_s / round_s)) if round_s > 0 else 1
    result = Rounds(names, calls, {n: [] for n in names}, {n: [] for n in names})
    budget = rounds + (max_extra_rounds if max_extra_rounds is not None else 2 * rounds)
    while len(result.foreign_clean) < rounds and len(result.orders) < budget:
        k = len(result.orders) % len(names)
        order = names[k:] + names[:k]
        foreign = meter()
        per_call = {}
        for name in order:
            start = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            per_call[name] = (time.perf_counter() - start) / calls
        cores = foreign.cores()
        quiet = cores < quiet_cores
        for name, seconds in per_call.items():
            (result.clean if quiet else result.contended)[name].append(seconds)
        (result.foreign_clean if quiet else result.foreign_contended).append(cores)
        result.orders.append(order)
    if len(result.foreign_clean) < min(3, rounds):  # never quiet enough: use every round, say so
        result.warning = "too few quiet rounds: the figures include contended rounds"
        for name in names:
            result.clean[name] += result.contended[name]
    return result


def summarize(result: Rounds, baseline: str = "official") -> dict:
    """Median / min / max ms per variant; for the others, ratio = median(baseline) / median(variant)
    (> 1: faster than the baseline) and the min / median / max of the per-round ratios."""
    base = result.clean[baseline]
    variants = {}
    for name in result.names:
        times = result.clean[name]
        row = {
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "max_ms": 1e3 * max(times),
            "rounds": len(times),
        }
        if name != baseline:
            per_round = [b / t for b, t in zip(base, times)]  # same round, same background load
            row.update(
                ratio=statistics.median(base) / statistics.median(times),
                ratio_round_min=min(per_round),
                ratio_round_median=statistics.median(per_round),
                ratio_round_max=max(per_round),
            )
        variants[name] = row
    return {
        "variants": variants,
        "calls_per_round": result.calls_per_round,
        "rounds_run": len(result.orders),
        "rounds_quiet": len(result.foreign_clean),
        "rounds_contended": len(result.foreign_contended),
        "foreign_cores_quiet_max": round(max(result.foreign_clean), 2) if result.foreign_clean else None,
        "foreign_cores_contended": [round(c, 2) for c in result.foreign_contended],
        "first_in_round": [order[0] for order in result.orders],
        "warning": result.warning,
    }


# ----------------------------------------------------------------------------- profiler
# torch.optim wraps step() and zero_grad() in a profiler range named "Optimizer.step#AdamW.step" etc.
# On a CPU the default (single-tensor) AdamW reads every parameter's step count with .item(): one
# host sync per parameter and step, the same on both sides, so ops are also counted without it.
OPTIMIZER_RANGE = "Optimizer."


def _summary(counts: Counter) -> dict:
    return {
        "aten_ops": sum(c for k, c in counts.items() if k.startswith("aten::")),
        **{label: sum(counts.get(k, 0.0) for k in keys) for label, keys in COUNTED.items()},
    }


PYTHON_FRAME = re.compile(r"^(?P<file>.+)\((?P<line>\d+)\): (?P<func>.+)$")  # with_stack's frame events
BACKWARD_RANGE = "autograd::engine::evaluate_function: "
SITE_OPS = {"host_syncs": SYNC_OPS, "casts": CAST_OPS, "copies": COPY_OPS}


def _site(event) -> str:
    """Where an op ran: inside the optimizer, in the backward of an autograd node, or in the innermost
    Python function outside torch that led to it (with_stack names a function by its def line)."""
    chain, parent = [], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    for name in chain:
        if name.startswith(OPTIMIZER_RANGE):
            return name.split("#")[-1]
        if name.startswith(BACKWARD_RANGE):
            return "backward of " + name[len(BACKWARD_RANGE) :]
    for name in chain:
        frame = PYTHON_FRAME.match(name)
        if frame and not frame["file"].startswith("torch/") and "/torch/" not in frame["file"]:
            path = "/".join(frame["file"].split("/")[-2:])
            return f"{path}:{frame['line']} {frame['func']}"
    return "?"


def _counts_outside_optimizer(events) -> Counter:
    """Per-op counts of the aten ops that ran outside every optimizer range (model, loss, backward)."""
    counts = Counter()
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(OPTIMIZER_RANGE):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def profile_ops(variants: dict[str, Callable[[], object]], calls: int = 3, per_call: int = 1) -> dict:
    """torch.profiler (CPU) over `calls` calls of each variant after one untimed call. Counts are per
    call divided by `per_call` (e.g. the Euler steps of one sampling call); "model" counts leave out
    the ops inside the optimizer's step and zero_grad; "sites" says where the host syncs, casts and
    copies ran (see _site)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, fn in variants.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            for _ in range(calls):
                fn()
        averages, events = prof.key_averages(), prof.events()
        div = calls * per_call
        counts = Counter({e.key: e.count / div for e in averages})
        model = Counter({k: c / div for k, c in _counts_outside_optimizer(events).items()})
        sites = {label: Counter() for label in SITE_OPS}
        for event in events:
            for label, keys in SITE_OPS.items():
                if event.name in keys:
                    sites[label][_site(event)] += 1 / div
        self_ms = {e.key: e.self_cpu_time_total / 1e3 / div for e in averages}
        out[name] = {
            **_summary(counts),
            "self_cpu_ms": sum(self_ms.values()),
            "has_optimizer": any(k.startswith(OPTIMIZER_RANGE) for k in counts),
            "model": _summary(model),
            "top_self_cpu": [
                (k, round(ms, 3), round(counts[k], 1)) for k, ms in Counter(self_ms).most_common(6)
            ],
            "op_counts": {k: round(c, 3) for k, c in sorted(counts.items()) if k.startswith("aten::")},
            "model_op_counts": {k: round(c, 3) for k, c in sorted(model.items())},
            "sites": {
                label: [(k, round(c, 2)) for k, c in found.most_common(6)] for label, found in sites.items()
            },
            "_self_ms": self_ms,
        }
    return out


def _largest_differences(mine: dict, base: dict, top: int) -> list[tuple[str, float]]:
    delta = {k: mine.get(k, 0.0) - base.get(k, 0.0) for k in set(mine) | set(base)}
    return sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:top]


def op_differences(profiles: dict, baseline: str = "official", top: int = 8) -> dict:
    """Per variant (minus the baseline): the aten ops whose per-call counts differ most, in the whole
    call and outside the optimizer, and the ops whose self-CPU ms differ most. Drops the raw self-ms
    tables from `profiles`."""
    diffs = {}
    base = profiles.get(baseline)
    for name, prof in profiles.items():
        if base is not None and name != baseline:
            diffs[name] = {
                key: [(k, round(v, 3)) for k, v in _largest_differences(prof[key], base[key], top) if v]
                for key in ("op_counts", "model_op_counts")
            }
            diffs[name]["self_cpu_ms"] = [
                (k, round(v, 3)) for k, v in _largest_differences(prof["_self_ms"], base["_self_ms"], top)
            ]
    for prof in profiles.values():
        prof.pop("_self_ms", None)
    return diffs
