"""What a training run resolves once at the start, and the per-step numerics shared by the stages.

`Run` holds the device, autocast dtype, ranks, run folder and the metric writers (metrics.jsonl,
TensorBoard, optionally Weights & Biases); seeding and the gathered RNG states make resumed runs
bit-identical; `unscale_and_clip`, `read_flags` and `step_or_skip` skip an update whose loss or
grad norm is non-finite, with one host sync per step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from rectok import kernels
from rectok.checkpoints import store
from rectok.environment import environment
from rectok.training import distributed as D
from rectok.training import wandb_logger
from rectok.training.config import TrainConfig, format_config
from rectok.training.optim import clip_grad_norm


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row (`max_nonfinite`)."""


class RunDirError(OSError):
    """The run folder cannot be created or written (a file in its path, read-only or full disk)."""


def missing_inputs(cfg: TrainConfig) -> list[str]:
    """One line per input path the run reads that does not exist (checked before the run folder is
    written, so that a typo leaves no half-made run behind)."""
    paths = {"data.path": cfg.data.path if cfg.data.path != "demo" else ""}
    if cfg.resume not in store.RESUME_MODES:
        paths["resume"] = cfg.resume
    if cfg.stage == "decoder":
        paths["tok.init_from"] = cfg.tok.init_from
    if cfg.stage == "dit":
        paths["dit.tokenizer_ckpt"] = cfg.dit.tokenizer_ckpt
    return [
        f"--{key} {path}: no such file or folder"
        for key, path in paths.items()
        if path and not Path(path).exists()
    ]


def _run_dir_problem(run_dir: Path, err: OSError) -> str:
    """`err` from creating / writing run_dir as one line naming the path and the cause."""
    cause = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
    # "Not a directory" alone does not say which part of the path is the file.
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                cause = f"{parent} is a file, not a folder"
            break
    return f"cannot create or write the run folder --run_dir {run_dir}: {cause}"


class Run:
    """Device, precision, rank, run folder and logging of one training run, resolved once."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.info = D.init_distributed(cfg.device)
        self.device = self.info.device
        on_cuda = self.device.type == "cuda"
        # bf16/fp16 autocast on CUDA only: CPU autocast is slow and the CPU runs are for checks.
        self.amp_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if on_cuda else None
        )
        if on_cuda:
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        os.environ["RECTOK_KERNELS"] = cfg.kernels  # read by every rectok.kernels op (and DataLoader workers)
        self.run_dir = Path(cfg.run_dir)
        self.writer = None
        self.metrics_file = None
        self.wandb = None  # the wandb module on rank 0 with --wandb
        self._closers: list = []
        self.environment = environment(self.device)  # environment.json and every checkpoint
        self.t0 = time.time()
        # Before anything is written: refuse missing inputs, drop temp files of interrupted saves, and
        # refuse (or, with --resume never, archive) a previous run so that step 0 never appends to its
        # metrics.
        missing = missing_inputs(cfg)
        if missing:
            raise ValueError("missing input:\n  - " + "\n  - ".join(missing))
        wandb = wandb_logger.import_wandb(cfg.wandb) if cfg.wandb and self.info.is_main else None
        try:
            moved = store.prepare_run_dir(cfg.resume, self.run_dir, self.info.is_main)
            if self.info.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "images").mkdir(exist_ok=True)
                store.atomic_write(
                    self.run_dir / "config.json", lambda f: f.write(format_config(cfg).encode())
                )
                env = json.dumps(self.environment, indent=2)
                store.atomic_write(self.run_dir / "environment.json", lambda f: f.write(env.encode()))
                self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
                wandb_id = wandb_logger.stable_id(self.run_dir, moved) if wandb else None
        except OSError as err:  # only the file system calls above: a clear line, not a traceback
            raise RunDirError(_run_dir_problem(self.run_dir, err)) from err
        if self.info.is_main:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # a base dependency: no guard

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            if wandb is not None:
                self.print(wandb_logger.start(wandb, cfg.wandb, self.run_dir, wandb_id, cfg.to_dict()))
                self.wandb = wandb
        D.barrier()
        kernel_backend = kernels.current_backend()
        self.print(
            f"device {self.device} x {self.info.world_size} rank(s), autocast "
            f"{self.amp_dtype or 'off (float32)'}, compile {cfg.compile_scope if cfg.compile else 'off'}, "
            f"kernels {kernel_backend}, "
            f"TF32 {'on' if on_cuda else 'n/a'}\nresolved config:\n{format_config(cfg)}"
        )

    def print(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        record = {"step": step, "time": round(time.time() - self.t0, 3), **scalars}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def rewind_to(self, step: int) -> None:
        """On resume at `step`: drop the metrics rows (and TensorBoard events) of later steps, which the
        resumed run is about to redo, so that no step appears twice."""
        if not self.info.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        self.metrics_file.close()
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                later = json.loads(line)["step"] > step
            except (json.JSONDecodeError, KeyError, TypeError):  # a torn last line of a killed run
                later = True
            if later:
                dropped += 1
            else:
                kept.append(line + "\n")
        store.atomic_write(path, lambda f: f.write("".join(kept).encode()))
        self.metrics_file = open(path, "a")
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            # purge_step: TensorBoard hides the events of steps >= step + 1 left by the earlier run.
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1)
        if dropped:
            self.print(f"metrics.jsonl: dropped {dropped} rows after step {step} (they are redone now)")
        # W&B keeps the rows it holds: online it ignores, with a warning, redone steps below its last
        # one (values that a bit-exact resume reproduces anyway).

    def close_with_run(self, close) -> None:
        """Call `close` when the run closes, also when it stops on an error: a progress bar left open
        would glue the error line that follows to its last update."""
        self._closers.append(close)

    def close(self) -> None:
        for close in self._closers:
            close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> list[dict]:
    """Every rank's global RNG states (Python, numpy, torch CPU and CUDA), gathered for the checkpoint.

    All training randomness (masking, posterior samples, flow noise, DiT times, label dropout) draws
    from the per-rank-seeded global generators; data loading never touches them (epoch_batches)."""
    return D.all_gather_object(store.rng_state())


def restore_rng(states: list[dict] | None, run: Run) -> None:
    if states is None or len(states) != run.info.world_size:
        run.print(
            "warning: the checkpoint's RNG states do not match this world size; continuing with fresh "
            "seeds (the run continues, but not bit-identically)"
        )
        return
    store.set_rng_state(states[run.info.rank])


def nonfinite_flag(*values: torch.Tensor) -> torch.Tensor:
    """1.0 when any value on any rank is NaN/Inf, else 0.0: a 0-dim tensor on the values' device, so
    that the caller reads it in the step's single host sync (see `read_flags`)."""
    bad = torch.zeros((), device=values[0].device)
    for v in values:
        bad = torch.maximum(bad, (~torch.isfinite(v.detach().float())).any().float())
    return D.all_reduce_max(bad)


def unscale_and_clip(
    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor], clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale the grads and clip their norm. Returns (grad norm before clipping, a `nonfinite_flag`
    of that norm). With fp16 the flag is 0: the GradScaler skips overflowing steps itself (and
    lowers the scale). Nothing is read to the host here."""
    scaler.unscale_(opt)
    norm = clip_grad_norm(params, clip)
    if scaler.is_enabled():
        return norm, torch.zeros((), device=norm.device)
    total = D.full_tensor(norm.detach())  # under FSDP the norm is a DTensor: its full value
    return norm, (~torch.isfinite(total.float())).float()


def read_flags(*flags: torch.Tensor) -> list[bool]:
    """The step's one host sync: every non-finite flag of the step read together."""
    return [v > 0 for v in torch.stack(flags).tolist()]


def step_or_skip(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: bool) -> None:
    """Apply the update unless `skip`; the GradScaler is updated and the grads cleared either way."""
    if not skip:
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
