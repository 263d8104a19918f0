"""Where a training run stands and how that is saved, restored and shown.

`Schedule`: steps per epoch, total steps and the learning rate of every step. `Position`:
optimizer steps done, the data position (epoch, micro-batches of it consumed) and the
non-finite-loss counters -- everything a checkpoint needs to continue bit-identically.
`StepMeter`: throughput since this (re)start, the metrics record and, on rank 0, a progress bar
(on a terminal) or one plain line per record (logs of batch jobs: no carriage returns).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rectok.training import distributed as D
from rectok.training.config import TrainConfig
from rectok.training.optim import LRSchedule
from rectok.training.runtime import NonFiniteLossError, Run, restore_rng


class Schedule:
    """Step bookkeeping of a run: steps per epoch, total steps and the lr schedule (per iteration)."""

    def __init__(self, cfg: TrainConfig, batches_per_epoch: int, accum: int) -> None:
        self.accum = accum
        self.steps_per_epoch = batches_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"one epoch has {batches_per_epoch} micro-batches per rank, fewer than the {accum} a step "
                "accumulates: lower --global_batch or use more data"
            )
        spe = self.steps_per_epoch
        self.total = max(1, math.ceil(cfg.epochs * spe))
        if cfg.max_steps:
            self.total = min(self.total, cfg.max_steps)
        o = cfg.optim
        end = round((o.decay_end_epochs or cfg.epochs) * spe)
        self.lr = LRSchedule(
            o.schedule,
            cfg.base_lr(),
            max(end, 1),
            round(o.warmup_epochs * spe),
            o.min_lr,
            round(o.hold_epochs * spe),
        )

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


@dataclass
class Position:
    """Optimizer steps done, micro-batches consumed in `epoch`, and the non-finite counters."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0

    @classmethod
    def resume(cls, state: dict, path: Path, sched: Schedule, run: Run, cfg: TrainConfig) -> Position:
        """The position saved in checkpoint `state` (read from `path`); also restores this rank's
        global RNG and warns when the config or the batch geometry changed since."""
        warn_config_changes(state["config"], cfg, run)
        epoch, batch = data_position(state, sched, run, cfg)
        counters = state["counters"]
        pos = cls(state["step"], epoch, batch, counters["nonfinite_total"], counters["nonfinite_streak"])
        restore_rng(state.get("rng"), run)
        run.rewind_to(pos.step)
        run.print(f"resumed from {path} at step {pos.step} (epoch {epoch}, batch {batch})")
        return pos

    def checkpoint_entries(self, sched: Schedule, run: Run, cfg: TrainConfig) -> dict:
        """The checkpoint's "step", "epoch", "data" and "counters" entries."""
        return {
            "step": self.step,
            "epoch": sched.epoch_of(self.step),
            "data": {
                "epoch": self.epoch,
                "batch": self.batch,
                "micro_batch": cfg.micro_batch,
                "world_size": run.info.world_size,
                "accum": sched.accum,
            },
            "counters": {"nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak},
        }

    def count_update(self, skipped: bool, max_nonfinite: int, run: Run) -> None:
        """Count an optimizer step; `max_nonfinite` skipped (non-finite) updates in a row stop the run."""
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        streak = self.nonfinite_streak
        step = self.step + 1  # called before the step counter moves: the number metrics.jsonl gives it
        run.print(
            f"step {step}: non-finite loss or grad norm, update skipped "
            f"({streak} in a row, {self.nonfinite_total} total)"
        )
        if streak >= max_nonfinite:
            raise NonFiniteLossError(
                f"stopping at step {step}: {streak} non-finite losses in a row "
                f"(max_nonfinite = {max_nonfinite}); no update was applied for them, and the last "
                f"checkpoint in {run.run_dir} holds finite weights. "
                "Lower the learning rate or check the data, then continue with --resume auto."
            )


def data_position(state: dict, sched: Schedule, run: Run, cfg: TrainConfig) -> tuple[int, int]:
    """(epoch, micro-batch within the epoch) to continue from."""
    data = state["data"]
    same = data["micro_batch"] == cfg.micro_batch and data["world_size"] == run.info.world_size
    if same and data["accum"] == sched.accum:
        return data["epoch"], data["batch"]
    run.print("warning: batch geometry changed since the checkpoint; continuing at the next epoch boundary")
    return data["epoch"] + (1 if data["batch"] else 0), 0


# Options that may change between a run and its continuation without a warning.
RESUMABLE_CHANGES = {
    "resume",
    "optim.fused",
    "ckpt_verify",
    "max_steps",
    "run_dir",
    "log_every",
    "image_every",
    "ckpt_every",
    "keep_last",
    "tensorboard",
    "export",
    "debug_nan_steps",
    "wandb",
    "progress",
    "eval_every",
    "data.online_eval_images",
    "data.inception_weights",
}


def warn_config_changes(saved: dict, cfg: TrainConfig, run: Run) -> None:
    now = _flat(cfg.to_dict())
    changed = {
        k: (v, now.get(k)) for k, v in _flat(saved).items() if now.get(k) != v and k not in RESUMABLE_CHANGES
    }
    if changed:
        run.print(f"warning: config differs from the checkpoint's: {changed}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def use_bar(progress: str) -> bool:
    """--progress: "bar", "lines", or "auto": a bar only when both stdout and stderr (where tqdm
    draws) are terminals, so that a redirected log never fills with carriage-return updates."""
    if progress == "auto":
        return sys.stdout.isatty() and sys.stderr.isatty()
    return progress == "bar"


def duration(seconds: float) -> str:
    """65 -> "1m05s", 7380 -> "2h03m"."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StepMeter:
    """Images per second since this run (re)started at `step`, the metrics record and, on rank 0, a
    progress bar or (--progress lines) one line per record."""

    def __init__(self, run: Run, sched: Schedule, step: int, desc: str) -> None:
        self.run, self.sched = run, sched
        self.start_step, self.t_start = step, time.time()
        self.bar = None
        if run.info.is_main and use_bar(run.cfg.progress):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=sched.total, initial=step, desc=desc, dynamic_ncols=True)
            run.close_with_run(self.close)

    def wall_s(self) -> float:
        return time.time() - self.t_start

    def log(
        self, step: int, losses: dict[str, float], lr: float, grad_norm: torch.Tensor, nonfinite_total: int
    ) -> None:
        """One metrics.jsonl / TensorBoard (/ W&B) record: the (rank-averaged) losses, then lr, grad
        norm, epoch, throughput and the non-finite count; the bar or the line shows loss, throughput
        and lr (the line also the time left)."""
        wall = self.wall_s()
        ips = self.run.cfg.global_batch * (step - self.start_step) / wall
        scalars = {
            **losses,
            "lr": lr,
            "grad_norm": float(D.full_tensor(grad_norm)),  # a DTensor under FSDP
            "epoch": self.sched.epoch_of(step),
            "images_per_s": ips,
            "nonfinite_total": nonfinite_total,
        }
        self.run.log(step, scalars)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
        else:  # rank 0 only (Run.print)
            total = self.sched.total
            eta = wall * (total - step) / (step - self.start_step)
            self.run.print(
                f"step {step}/{total} ({100 * step / total:.1f}%) | loss {losses['loss']:.4f} | "
                f"{ips:.1f} img/s | lr {lr:.2e} | eta {duration(eta)}"
            )

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
