"""One tokenizer of the study, in a worker process: train.py's real code path, then the flow probe.

`train_and_probe(job)` runs `train.main(argv)` (the script's own function, loaded from the
repository's train.py) with the worker's output going to the run's log file, then loads the EMA
export the run wrote (`tokenizer_ema.safetensors`, what a user would probe) and probes mean-pooled
z_t along tau with rectok.eval.probe.probe_along_flow. Workers are spawned processes with one
intra-op thread each: on a 2-core machine two single-thread runs side by side train faster than
one two-thread run, and they degrade gracefully when another job shares the cores (two-thread
OpenMP runs under oversubscription were measured 30x slower here, 4.8 vs 175 img/s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import rectok

_DATA: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}  # per worker: the probe images, once


def train_script_main() -> Callable[[list[str]], dict]:
    """`main` of the repository's train.py (a script beside the package, not a module)."""
    path = Path(rectok.__file__).resolve().parents[1] / "train.py"
    if not path.is_file():
        raise FileNotFoundError(f"train.py not found at {path}: run the study from a source checkout")
    spec = importlib.util.spec_from_file_location("rectok_train_script", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.main


@contextlib.contextmanager
def output_to(path: Path, mode: str = "w") -> Iterator[None]:
    """Send this process's stdout and stderr (Python, logging, tqdm and C level) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, mode) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def probe_images(root: Path, image_size: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) of the data set, read once per process."""
    from rectok.study.teacher import load_split

    key = (str(root), image_size)
    if key not in _DATA:
        _DATA[key] = (*load_split(root, "train", image_size), *load_split(root, "val", image_size))
    return _DATA[key]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 250) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(size), y.split(size)))


def probe_export(run_dir: Path, data_root: Path, taus: list[float], seed: int = 0) -> dict:
    """probe_along_flow of the run's EMA export on the whole train split -> the whole val split."""
    from rectok.checkpoints.loading import load_tokenizer
    from rectok.eval.probe import ProbeConfig, probe_along_flow

    tok = load_tokenizer(run_dir / "tokenizer_ema.safetensors").model.eval()
    x_tr, y_tr, x_va, y_va = probe_images(data_root, tok.cfg.img_size)
    result = probe_along_flow(
        tok, _batches(x_tr, y_tr), _batches(x_va, y_va), taus, ProbeConfig(seed=seed), progress=False
    )
    return {**result, "accuracy": {f"{t:g}": a for t, a in result["accuracy"].items()}}


def train_and_probe(job: dict) -> dict:
    """Train one tokenizer (job["argv"] for train.main) and probe it; returns a JSON-able summary."""
    torch.set_num_threads(job["threads"])
    run_dir, started = Path(job["run_dir"]), time.perf_counter()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"  # beside the run folder, which train.py creates
    with output_to(log):
        result = train_script_main()(job["argv"])
    train_s = time.perf_counter() - started
    history = result["history"]
    summary = {
        "name": job["name"],
        "label": job["label"],
        "ablation": job["ablation"],
        "seed": job["seed"],
        "run_dir": str(run_dir),
        "log": str(log),
        "steps": result["step"],
        "loss_start": history[0] if history else None,
        "loss_end": sum(history[-10:]) / len(history[-10:]) if history else None,  # last 10 steps
        "semantic_end": last_logged(run_dir, "semantic"),
        "heldout_psnr_ema": result["eval_end"].get("psnr_ema"),
        "train_wall_s": round(train_s, 1),
    }
    del result
    probe_started = time.perf_counter()
    with output_to(log, "a"):
        summary["probe"] = probe_export(run_dir, Path(job["data"]), job["taus"])
    summary["probe_wall_s"] = round(time.perf_counter() - probe_started, 1)
    return summary


def last_logged(run_dir: Path, key: str) -> float | None:
    """The last value of scalar `key` (e.g. "semantic") the run logged to metrics.jsonl."""
    import json

    value = None
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for k, v in row.items():
                if k.split("/")[-1] == key and isinstance(v, (int, float)):
                    value = float(v)
    return value


def last_progress_line(log: Path) -> str:
    """The newest 'step N/M ...' line of a run's log ('' before the first)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    steps = [line for line in lines if line.startswith("step ")]
    return steps[-1].split(" | eta")[0] if steps else ""
