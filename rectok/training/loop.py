"""What every stage's training loop shares around its own networks and loss: the checkpoint entries
that make a resumed run bit-identical, writing a checkpoint, the periodic image / checkpoint hooks,
resuming, the loss history, and the count of unreadable training images at the end. The loops
themselves live in tokenizer_stage.py (stage 1), decoder_stage.py (stage 2) and dit_stage.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rectok.checkpoints import store
from rectok.training import distributed as D
from rectok.training.batches import bad_image_indices, restore_bad_images, skipped_training_images
from rectok.training.config import TrainConfig
from rectok.training.progress import Position, Schedule
from rectok.training.runtime import Run, rng_states


def run_entries(pos: Position, sched: Schedule, run: Run, cfg: TrainConfig, loader) -> dict:
    """The checkpoint entries of every stage besides its networks and optimizers: the data position
    and counters, every rank's RNG states, the unreadable images met so far, the environment and the
    config. Collective (RNG states and bad images are gathered): every rank calls it."""
    rngs, bad_images = rng_states(), bad_image_indices(loader)
    return {
        **pos.checkpoint_entries(sched, run, cfg),
        "rng": rngs,
        "bad_images": bad_images,
        "environment": run.environment,
        "config": cfg.to_dict(),
    }


def resume_position(state: dict, path: Path, sched: Schedule, run: Run, cfg: TrainConfig, loader) -> Position:
    """Where the checkpoint `state` (read from `path`) left off: the position and counters, this
    rank's RNG states, and the unreadable images met before, so that metrics.json counts the whole
    run. Warns when the config or the batch geometry changed since."""
    pos = Position.resume(state, path, sched, run, cfg)
    restore_bad_images(loader, state)
    return pos


def write_checkpoint(run: Run, state: dict, step: int, keep_last: int) -> Path:
    """Rank 0: the checkpoint of `step` into the run folder (atomic, listed in manifest.json)."""
    path = store.save_checkpoint(run.run_dir, state, step, keep_last=keep_last)
    run.print(f"saved {path}")
    return path


def periodic_hooks(
    cfg: TrainConfig, step: int, total: int, images: Callable[[str], object], save: Callable[[], None]
) -> None:
    """After optimizer step `step`: the image grid every `image_every` steps and a checkpoint every
    `ckpt_every` steps; the last step's grid and checkpoint are the run's final ones, written by the
    stage itself."""
    if cfg.image_every and step % cfg.image_every == 0 and step < total:
        images(f"{step:07d}")
    if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
        save()


def count_skipped_images(loader, run: Run) -> int:
    """The distinct unreadable training images this run substituted, with a warning when there were
    any. Each was logged by the loader when it was met; this is the total for metrics.json.
    Collective: call it on every rank, before rank-0-only work."""
    skipped = skipped_training_images(loader)
    if skipped:
        run.print(f"warning: {skipped} unreadable training image(s) skipped (substituted) in this run")
    return skipped


class LossHistory:
    """The rank-mean loss of every step of this run. Losses stay on the device until `read`, which
    the loops call at log steps (every rank alike: it all-reduces), so that a step costs no host
    sync for its loss: one all-reduce and one sync per log step instead of one per step."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())

    def read(self) -> list[float]:
        if self.pending:
            self.values += D.all_reduce_mean(torch.stack(self.pending)).tolist()
            self.pending = []
        return self.values
