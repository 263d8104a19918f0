"""The FSD study (issue 12): linear probing along the flow with and without flow semantic distillation.

    python -m rectok.study fsd            # the full study, ~20 min on 2 CPU cores -> runs/study-fsd/
    python -m rectok.study fsd --quick    # the smoke test's version, well under a minute

Stages: (1) a procedural 10-class texture set (rectok.study.textures); (2) a small ViT teacher
trained on its train split (rectok.study.teacher; never the random one); (3) matched tiny tokenizers
through train.py's real code path, one per ablation row and seed, differing only in `--ablation`:
"" (the paper's FSD + RAD), no-fsd, align-only, recon-only; (4) for each, a linear probe of
mean-pooled z_t along tau (rectok.eval.probe) on held-out images; then the report
(rectok.study.report: report.md, probe.png, results.json).

Seeds run as whole groups (one tokenizer per ablation) so that every finished seed is a matched
comparison. Past `min_seeds` groups, a further group starts only if the time measured for the last
one still fits the budget; skipped seeds are named in the report.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rectok.study.runner import last_progress_line, train_and_probe
from rectok.study.teacher import train_teacher
from rectok.study.textures import CLASSES, ensure_textures_dataset

# Report label -> the `--ablation` name of train.py (rectok.training.config.ABLATIONS).
MODELS: dict[str, str] = {
    "FSD+RAD": "",  # the paper: semantic decoder on z_t, loss on all tokens
    "no-fsd": "no-fsd",  # semantic decoder on the clean z
    "align-only": "align-only",  # semantic loss on the visible tokens only
    "recon-only": "recon-only",  # semantic loss on the masked tokens only
}
RUN_NAMES = {"FSD+RAD": "fsd", "no-fsd": "no-fsd", "align-only": "align-only", "recon-only": "recon-only"}


@dataclass
class StudyConfig:
    out: Path = Path("runs/study-fsd")
    data: Path | None = None  # default: out/data (reused when complete)
    seeds: tuple[int, ...] = (0, 1, 2)
    min_seeds: int = 2  # always run this many seed groups, whatever the budget
    budget_s: float = 1200.0  # the whole study, including the report
    tok_steps: int = 300
    batch: int = 32
    teacher_steps: int = 1500
    teacher_lr: float = 3e-3
    train_per_class: int = 500
    val_per_class: int = 100
    taus: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    workers: int = 2
    threads: int = 1  # intra-op threads per worker (see rectok.study.runner)
    stats_images: int = 500
    quick: bool = False
    extra: list[str] = field(default_factory=list)  # more train.py options, for every tokenizer

    @property
    def data_root(self) -> Path:
        return self.data or self.out / "data"


QUICK = dict(
    seeds=(0, 1), min_seeds=2, tok_steps=3, teacher_steps=100, train_per_class=16, val_per_class=8,
    taus=(0.0, 0.5, 1.0), stats_images=16, quick=True,
)  # fmt: skip


class Clock:
    """Elapsed time and load, printed with every progress line so that a long run is never silent."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loads: list[tuple[float, tuple[float, float, float]]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sample_load(self) -> tuple[float, float, float]:
        load = os.getloadavg()
        self.loads.append((round(self.elapsed(), 1), tuple(round(v, 2) for v in load)))
        return load

    def log(self, message: str) -> None:
        e = int(self.elapsed())
        print(f"[study {e // 60:02d}:{e % 60:02d} load {self.sample_load()[0]:.1f}] {message}", flush=True)


def tokenizer_argv(cfg: StudyConfig, ablation: str, seed: int, run_dir: Path, teacher: Path) -> list[str]:
    """train.py options of one tokenizer: the ("tokenizer", "tiny") preset (perceptual loss and GAN
    off, random-weight perceptual nets never loaded) on the study's data and teacher; only
    --ablation and --seed differ between runs. The lr schedule (5% warm-up, cosine) ends at tok_steps."""
    n_train = cfg.train_per_class * len(CLASSES)
    steps_per_epoch = n_train // cfg.batch
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training images are fewer than one batch of {cfg.batch}")
    epochs = cfg.tok_steps / steps_per_epoch
    return [
        "--stage", "tokenizer", "--preset", "tiny", "--ablation", ablation, "--seed", str(seed),
        "--run_dir", str(run_dir), "--device", "cpu", "--data.path", str(cfg.data_root),
        "--tok.teacher", "tiny", "--tok.teacher_weights", str(teacher),
        "--global_batch", str(cfg.batch), "--micro_batch", str(cfg.batch),
        "--max_steps", str(cfg.tok_steps), "--epochs", f"{epochs:.6g}",
        "--optim.warmup_epochs", f"{0.05 * epochs:.6g}",
        "--data.stats_images", str(cfg.stats_images), "--data.eval_images", "16",
        "--tensorboard", "false", "--image_every", "0", "--ckpt_every", "0", "--progress", "lines",
        "--log_every", str(max(1, cfg.tok_steps // 20)),
        *cfg.extra,
    ]  # fmt: skip


def _wait(futures: dict[cf.Future, dict], clock: Clock, every: float = 20.0) -> list[dict]:
    """Wait for a group of runs, printing each running job's latest step line every `every` s."""
    done: list[dict] = []
    pending = set(futures)
    while pending:
        finished, pending = cf.wait(pending, timeout=every, return_when=cf.FIRST_COMPLETED)
        for fut in finished:
            job = futures[fut]
            result = fut.result()  # a failed run stops the study with its own error
            done.append(result)
            acc = ", ".join(f"{t}: {100 * a:.1f}" for t, a in result["probe"]["accuracy"].items())
            clock.log(
                f"  done {job['name']}: {result['steps']} steps in {result['train_wall_s']:.0f}s, loss "
                f"{result['loss_end']:.3f}, PSNR {result['heldout_psnr_ema']:.2f} dB; probe % by tau {acc}"
            )
        if pending and not finished:
            logs = {futures[f]["name"]: Path(futures[f]["log"]) for f in pending}
            running = [
                f"{name}: {last_progress_line(log) or 'starting'}"
                for name, log in logs.items()
                if log.exists()
            ]
            clock.log("  " + " || ".join(running))
    return done


def run_study(cfg: StudyConfig, command: str = "python -m rectok.study fsd") -> dict:
    """Every stage; returns the results dict that rectok.study.report writes."""
    from rectok.study.report import write_report

    clock = Clock()
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    clock.log(f"stage 1/4 data: {len(CLASSES)} texture classes, {cfg.train_per_class} train / "
              f"{cfg.val_per_class} val per class -> {cfg.data_root}")  # fmt: skip
    t = time.perf_counter()
    ensure_textures_dataset(
        cfg.data_root, train_per_class=cfg.train_per_class, val_per_class=cfg.val_per_class
    )
    stages["data"] = time.perf_counter() - t

    clock.log(f"stage 2/4 teacher: Teacher.tiny's ViT, supervised, {cfg.teacher_steps} steps")
    t = time.perf_counter()
    teacher = train_teacher(
        cfg.data_root, cfg.out / "teacher", steps=cfg.teacher_steps, lr=cfg.teacher_lr, log=clock.log
    )
    stages["teacher"] = time.perf_counter() - t
    head, probe = 100 * teacher["val_accuracy_head"], 100 * teacher["val_accuracy_linear_probe"]
    clock.log(f"  teacher val accuracy {head:.1f}% (head), {probe:.1f}% (linear probe); chance 10%")

    clock.log(f"stage 3/4 tokenizers + probes: {len(MODELS)} ablations x seeds {list(cfg.seeds)}, "
              f"{cfg.tok_steps} steps each, {cfg.workers} workers x {cfg.threads} thread")  # fmt: skip
    t = time.perf_counter()
    runs: list[dict] = []
    skipped_seeds: list[int] = []
    group_s: list[float] = []
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked OpenMP state, one thread each
    with cf.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
        for g, seed in enumerate(cfg.seeds):
            if g >= cfg.min_seeds and group_s:
                needed = group_s[-1] + 30.0  # the last group's time, plus the report
                if clock.elapsed() + needed > cfg.budget_s:
                    skipped_seeds = list(cfg.seeds[g:])
                    clock.log(f"  budget: seeds {skipped_seeds} skipped (a group takes ~{group_s[-1]:.0f}s, "
                              f"{cfg.budget_s - clock.elapsed():.0f}s left)")  # fmt: skip
                    break
            g_start = time.perf_counter()
            futures = {}
            for label, ablation in MODELS.items():
                run_dir = cfg.out / "runs" / f"{RUN_NAMES[label]}-s{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)  # ours, from an earlier study run
                job = dict(
                    name=f"{RUN_NAMES[label]}/s{seed}", label=label, ablation=ablation, seed=seed,
                    run_dir=str(run_dir), log=str(run_dir.parent / f"{run_dir.name}.log"),
                    argv=tokenizer_argv(cfg, ablation, seed, run_dir, Path(teacher["weights"])),
                    data=str(cfg.data_root), taus=list(cfg.taus), threads=cfg.threads,
                )  # fmt: skip
                futures[pool.submit(train_and_probe, job)] = job
            clock.log(f"  seed {seed}: started {', '.join(j['name'] for j in futures.values())}")
            runs.extend(_wait(futures, clock))
            group_s.append(time.perf_counter() - g_start)
    stages["tokenizers_and_probes"] = time.perf_counter() - t

    clock.log("stage 4/4 report")
    results = dict(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        models=MODELS, classes=list(CLASSES), teacher=teacher, runs=runs, skipped_seeds=skipped_seeds,
        stages_s={k: round(v, 1) for k, v in stages.items()}, loads=clock.loads,
    )  # fmt: skip
    results["command"] = command
    results["wall_s"] = round(clock.elapsed(), 1)
    paths = write_report(results, cfg.out)
    clock.log(f"wrote {', '.join(str(p) for p in paths.values())} (total {clock.elapsed() / 60:.1f} min)")
    return results
