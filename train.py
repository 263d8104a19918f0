"""Train the RecTok tokenizer (stage 1), fine-tune its pixel decoder (stage 2), or train DiT^DH.

    python train.py                      # CPU demo: tiny tokenizer on generated images, ~3-4 min
    python train.py --stage decoder      # tiny stage 2 from runs/demo
    python train.py --stage dit          # tiny DiT^DH on the demo tokenizer's latents
    torchrun --nproc_per_node 8 train.py --stage tokenizer --preset rectok-B --data.path /data/imagenet
    torchrun --nnodes 4 --node_rank $R --master_addr $A --nproc_per_node 8 train.py ...   # multi-node

Configuration: rectok/train_config.py (defaults -> preset -> --config JSON -> --key value);
`python train.py --help` lists every key. Everything a run writes lives in --run_dir:
ckpt_*.pt + `latest` + manifest.json (resume with --resume auto), config.json,
metrics.jsonl, TensorBoard events (tb/), images/*.png, the EMA weights as safetensors,
and metrics.json at the end.

SPEC sections implemented here: 2 (masking, posterior sample, forward flow; inside
RecTok.forward), 4 (losses), 5 (tokenizer recipe), 6 (DiT^DH objective and recipe).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rectok import checkpoint as ckpt
from rectok import distributed as D
from rectok import flow, kernels
from rectok.discriminator import PatchDiscriminator
from rectok.ema import EMA
from rectok.losses import DiscriminatorLoss, LossWeights, PerceptualLoss, tokenizer_loss
from rectok.optim import LRSchedule, build_adamw, clip_grad_norm, set_lr
from rectok.train_config import TrainConfig, format_config, parse_args

log = logging.getLogger("rectok.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row (`max_nonfinite`)."""


# ============================================================================ runtime
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
        self.t0 = time.time()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "images").mkdir(exist_ok=True)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
            ckpt.atomic_write(self.run_dir / "config.json", lambda f: f.write(format_config(cfg).encode()))
            self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.run_dir / "tb"))
                except ImportError:
                    log.warning(
                        "tensorboard is not installed: no TensorBoard events (pip install tensorboard, "
                        "or pass --tensorboard false to silence this); metrics.jsonl is written anyway"
                    )
        D.barrier()
        kernel_backend = kernels.current_backend()
        self.print(
            f"device {self.device} x {self.info.world_size} rank(s), autocast "
            f"{self.amp_dtype or 'off (float32)'}, compile {cfg.compile}, kernels {kernel_backend}, "
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

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (nn.Module.compile: state-dict names unchanged).

    Block-wise, as torchtitan does: the tokenizer's random mask ratio changes the encoder's
    sequence length every step and its Python-side sampling does not trace, while each block
    is a pure tensor function that Inductor fuses (with our kernels' custom ops inside)."""
    from rectok.dit import AdaLNBlock
    from rectok.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, (Block, AdaLNBlock))]
    for block in blocks:
        block.compile()
    return len(blocks)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ============================================================================ data
def data_root(cfg: TrainConfig, run: Run) -> Path:
    """The dataset folder; "demo" builds the demo dataset under data/demo (rank 0, once)."""
    if cfg.data.path != "demo":
        return Path(cfg.data.path)
    root = Path("data/demo")
    if run.info.is_main:
        from rectok.demo_data import ensure_demo_dataset

        ensure_demo_dataset(root)
    D.barrier()
    return root


def _split(root: Path, name: str) -> str | None:
    return name if (root / name).is_dir() else None


def train_loader(cfg: TrainConfig, run: Run, root: Path, image_size: int):
    from rectok.data import build_loader

    return build_loader(
        root,
        split=_split(root, "train"),
        batch_size=cfg.micro_batch,
        image_size=image_size,
        train=True,
        hflip=cfg.data.hflip,
        rank=run.info.rank,
        world_size=run.info.world_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        backend="auto",
        device=run.device,
    )


def held_out_images(cfg: TrainConfig, root: Path, image_size: int) -> torch.Tensor:
    """`eval_images` images spread evenly over the val split (train split if there is none), center
    crop, no flip, [-1, 1]: the same images for every run on this dataset."""
    from rectok.data import ImageDataset, resolve_samples

    samples = resolve_samples(root, _split(root, "val") or _split(root, "train"))
    dataset = ImageDataset(samples, image_size=image_size, crop="center", hflip=False, on_error="drop")
    picks = np.linspace(0, len(samples) - 1, min(cfg.data.eval_images, len(samples))).round().astype(int)
    images = [dataset[int(i)] for i in picks]
    return torch.stack([im["image"] for im in images if "image" in im])


class _SkipFirst:
    """A ShardedSampler view without its first n indices (resume mid-epoch without decoding them)."""

    def __init__(self, sampler, n: int) -> None:
        self.sampler, self.n = sampler, n

    def indices(self, epoch: int) -> list[int]:
        return self.sampler.indices(epoch)[self.n :]

    def __len__(self) -> int:
        return len(self.sampler) - self.n


def epoch_batches(loader, epoch: int, skip: int):
    """Batches of `epoch`, starting at batch `skip`. Data loading runs under fork_rng so that it
    never moves the global RNG (torch's DataLoader draws a seed per iterator), which keeps
    resumed runs bit-identical."""
    loader.set_epoch(epoch)
    original = getattr(loader, "sampler", None)
    fast = skip > 0 and hasattr(original, "indices") and hasattr(loader, "batch_size")
    if fast:  # PIL / cached loaders: leave out the consumed samples instead of decoding them
        loader.sampler = _SkipFirst(original, skip * loader.batch_size)
    try:
        it = iter(loader)
        for _ in range(0 if fast else skip):
            with torch.random.fork_rng(devices=[]):
                next(it)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                return
            yield batch
    finally:
        if fast:
            loader.sampler = original


# ============================================================================ images
def save_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> None:
    """PNG of image rows; each row [n, 3, H, W] in [0, 1]."""
    from PIL import Image

    n, _, h, w = rows[0].shape
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        arr = (row.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i in range(n):
            y0, x0 = pad + r * (h + pad), pad + i * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = arr[i]
    Image.fromarray(canvas).save(path)


@torch.no_grad()
def reconstruct(tok: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Posterior-mean reconstructions in [0, 1] of images x in [-1, 1] (eval mode, no noise)."""
    moments = tok.encoder(x)
    mean = moments[..., : moments.shape[-1] // 2]
    return (tok.pixel_decoder(mean).float() * 0.5 + 0.5).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


# ============================================================================ steps
def nonfinite_any(*values: torch.Tensor) -> bool:
    """True when any value on any rank is NaN/Inf (one host sync per optimizer step)."""
    bad = torch.zeros((), device=values[0].device)
    for v in values:
        bad = torch.maximum(bad, (~torch.isfinite(v.detach().float())).any().float())
    return bool(D.all_reduce_max(bad).item() > 0)


def optimizer_step(
    opt, scaler, params: list[torch.Tensor], clip: float, skip: bool
) -> tuple[torch.Tensor, bool]:
    """Unscale, measure (and clip) the grad norm, then step unless `skip` or the norm is non-finite;
    grads are cleared either way. Returns (grad norm before clipping, whether the update was skipped).
    With fp16 the GradScaler handles overflowing grads itself (skips and lowers the scale)."""
    scaler.unscale_(opt)
    norm = clip_grad_norm(params, clip)
    skipped = skip or (not scaler.is_enabled() and not math.isfinite(norm.item()))
    if not skipped:
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm, skipped


def nonfinite_message(step: int, streak: int, cfg: TrainConfig, run: Run) -> str:
    return (
        f"stopping at step {step}: {streak} non-finite losses in a row "
        f"(max_nonfinite = {cfg.max_nonfinite}); "
        f"no update was applied for them, and the last checkpoint in {run.run_dir} holds finite weights. "
        "Lower the learning rate or check the data, then continue with --resume auto."
    )


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


def rng_states() -> list[dict]:
    """Every rank's global RNG states (Python, numpy, torch CPU and CUDA), gathered for the checkpoint.

    All training randomness (masking, posterior samples, flow noise, DiT times, label dropout) draws
    from the per-rank-seeded global generators; data loading never touches them (epoch_batches)."""
    return D.all_gather_object(ckpt.rng_state())


def restore_rng(states: list[dict] | None, run: Run) -> None:
    if states is None or len(states) != run.info.world_size:
        run.print(
            "warning: the checkpoint's RNG states do not match this world size; continuing with fresh "
            "seeds (the run continues, but not bit-identically)"
        )
        return
    ckpt.set_rng_state(states[run.info.rank])


def warn_config_changes(saved: dict, cfg: TrainConfig, run: Run) -> None:
    ignore = {
        "resume",
        "max_steps",
        "run_dir",
        "log_every",
        "image_every",
        "ckpt_every",
        "keep_last",
        "tensorboard",
        "export",
        "debug_nan_steps",
    }
    now = _flat(cfg.to_dict())
    changed = {k: (v, now.get(k)) for k, v in _flat(saved).items() if now.get(k) != v and k not in ignore}
    if changed:
        run.print(f"warning: config differs from the checkpoint's: {changed}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def data_position(state: dict, sched: Schedule, run: Run, cfg: TrainConfig) -> tuple[int, int]:
    """(epoch, micro-batch within the epoch) to continue from."""
    data = state["data"]
    same = data["micro_batch"] == cfg.micro_batch and data["world_size"] == run.info.world_size
    if same and data["accum"] == sched.accum:
        return data["epoch"], data["batch"]
    run.print("warning: batch geometry changed since the checkpoint; continuing at the next epoch boundary")
    return data["epoch"] + (1 if data["batch"] else 0), 0


# ============================================================================ tokenizer models
def load_tokenizer(path: str | os.PathLike, device: torch.device, use_ema: bool = True):
    """A RecTok tokenizer (semantic decoder dropped) from one of this project's checkpoints (.pt, a run
    folder, or an exported .safetensors) or an official-layout file; also returns its raw checkpoint
    state (None for weight files), which the decoder stage uses to continue the EMA."""
    from rectok.tokenizer import RecTok, RecTokConfig

    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = ckpt.read_safetensors(path)
        if "config" in meta and isinstance(meta["config"], dict) and "token_channels" in meta["config"]:
            tok = RecTok(RecTokConfig.from_dict(meta["config"]))
            tok.load_state_dict(state, strict=True)
            return tok.to(device), None
    if path.suffix in (".safetensors", ".pth", ".bin"):
        from rectok.official import load_tokenizer as load_official

        return load_official(str(path)).to(device), None
    state = ckpt.load_checkpoint(path)
    if "model_config" not in state or "token_channels" not in state["model_config"]:
        raise ValueError(f"{path} is not a tokenizer checkpoint of this project (no tokenizer model_config)")
    cfg = RecTokConfig.from_dict({**state["model_config"], "semantic_dim": 0})
    tok = RecTok(cfg)
    weights = state["model"]
    if use_ema and state.get("ema") is not None:
        weights = {**state["ema"]["params"], **state["ema"]["buffers"]}
    weights = {k: v for k, v in weights.items() if not k.startswith("semantic_decoder.")}
    tok.load_state_dict({k: weights[k] for k in tok.state_dict()}, strict=True)
    return tok.to(device), state


def _drop_semantic(ema_state: dict) -> dict:
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("semantic_decoder.")}  # noqa: E731
    return {**ema_state, "params": keep(ema_state["params"]), "buffers": keep(ema_state["buffers"])}


def build_teacher(cfg: TrainConfig, tok_cfg, device: torch.device):
    from rectok.teacher import Teacher

    t = cfg.tok
    weights = t.teacher_weights or None
    if t.teacher == "tiny":
        teacher = Teacher.tiny(
            weights or "random", image_size=tok_cfg.img_size, token_patch=tok_cfg.patch_size
        )
    else:
        teacher = Teacher(t.teacher, weights, image_size=tok_cfg.img_size, token_patch=tok_cfg.patch_size)
    return teacher.to(device)


# ============================================================================ stage 1 / stage 2
def train_tokenizer(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """Stage 1 (FSD + RAD: masking, posterior sample, forward flow, both decoders, all losses) or
    stage 2 (pixel decoder only: frozen encoder, no noise/masking/KL/semantics/teacher, fresh D)."""
    from rectok.tokenizer import DiagonalGaussian, RecTok, make_config

    stage1 = cfg.stage == "tokenizer"
    device, info = run.device, run.info
    seed_everything(cfg.seed)  # same initial weights on every rank

    # ---- models
    teacher = None
    overrides: dict[str, Any] = {}
    if cfg.tok.token_channels:
        overrides["token_channels"] = cfg.tok.token_channels
    if stage1:
        probe_cfg = make_config(cfg.tok.preset, **overrides)
        if cfg.loss.semantic > 0:
            teacher = build_teacher(cfg, probe_cfg, device)
        overrides["semantic_dim"] = teacher.feature_dim if teacher is not None else 0
        overrides.update(
            mask_ratio_min=cfg.tok.mask_ratio_min,
            mask_ratio_max=cfg.tok.mask_ratio_max,
            noise_schedule=cfg.tok.noise_schedule,
            timestep_shift=cfg.tok.timestep_shift or None,
            gamma=cfg.tok.gamma,
        )
        tok = RecTok(make_config(cfg.tok.preset, **overrides)).to(device)
        init_ema_state = None
    else:
        tok, init_state = load_tokenizer(cfg.tok.init_from, device, use_ema=False)
        init_ema_state = _drop_semantic(init_state["ema"]) if init_state and init_state.get("ema") else None
        tok.requires_grad_(False)
        tok.pixel_decoder.requires_grad_(True)
    tok_cfg = tok.cfg
    ema = EMA(tok, cfg.optim.ema_decay)
    if init_ema_state is not None:  # the release continues stage 1's EMA in stage 2
        ema.load_state_dict({**init_ema_state, "decay": cfg.optim.ema_decay, "num_updates": 0})
    weights = LossWeights(cfg.loss.mse, cfg.loss.perceptual, cfg.loss.kl, cfg.loss.semantic, cfg.loss.gan)
    perceptual = None
    if cfg.loss.perceptual > 0:
        perceptual = PerceptualLoss(
            cfg.loss.perceptual_weights, cfg.loss.weights_dir or None, resize=cfg.loss.perceptual_resize
        ).to(device)
    disc = None
    if cfg.loss.gan > 0:
        disc = DiscriminatorLoss(PatchDiscriminator(ndf=cfg.loss.disc_ndf, n_layers=cfg.loss.disc_layers)).to(
            device
        )
    n_params = sum(p.numel() for p in tok.parameters() if p.requires_grad)
    run.print(
        f"tokenizer {cfg.tok.preset}: {n_params / 1e6:.2f}M trainable parameters, C = "
        f"{tok_cfg.token_channels}, {tok_cfg.img_size} px, teacher "
        f"{getattr(teacher, 'model_name', None)}"
    )

    # ---- optimizers (the discriminator gets its own AdamW with the same schedule)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt = build_adamw(tok, cfg.base_lr(), cfg.optim.weight_decay, betas)
    opt_d = build_adamw(disc, cfg.base_lr(), cfg.optim.weight_decay, betas) if disc is not None else None
    use_scaler = run.amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    scaler_d = torch.amp.GradScaler(device.type, enabled=use_scaler)
    g_params = [p for p in tok.parameters() if p.requires_grad]
    d_params = list(disc.parameters()) if disc is not None else []

    # ---- data
    root = data_root(cfg, run)
    loader = train_loader(cfg, run, root, tok_cfg.img_size)
    accum = cfg.grad_accum(info.world_size)
    sched = Schedule(cfg, len(loader), accum)
    eval_x = held_out_images(cfg, root, tok_cfg.img_size).to(device)

    # ---- wrappers (applied from outside; the bare modules are what gets saved)
    trained = tok if stage1 else tok.pixel_decoder
    if cfg.compile:
        compile_blocks(tok)
    fwd = D.wrap_ddp(trained, info)
    disc_fwd = D.wrap_ddp(disc, info) if disc is not None else None

    # ---- resume
    seed_everything(cfg.seed * 1000 + info.rank)
    step, epoch, batch_idx, nonfinite_total, streak = 0, 0, 0, 0, 0
    resume = ckpt.resolve_resume(cfg.resume, run.run_dir)
    if resume is not None:
        state = ckpt.load_checkpoint(resume)
        warn_config_changes(state["config"], cfg, run)
        tok.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if disc is not None and state.get("disc") is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["disc_optimizer"])
            scaler_d.load_state_dict(state["disc_scaler"])
        step = state["step"]
        epoch, batch_idx = data_position(state, sched, run, cfg)
        nonfinite_total, streak = state["counters"]["nonfinite_total"], state["counters"]["nonfinite_streak"]
        restore_rng(state.get("rng"), run)
        run.print(f"resumed from {resume} at step {step} (epoch {epoch}, batch {batch_idx})")

    ema_tok = copy.deepcopy(tok).eval().requires_grad_(False)

    def save(final: bool = False) -> None:
        rngs = rng_states()
        if info.is_main:
            state = {
                "model": D.unwrap(tok).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "disc": disc.state_dict() if disc is not None else None,
                "disc_optimizer": opt_d.state_dict() if opt_d is not None else None,
                "disc_scaler": scaler_d.state_dict(),
                "step": step,
                "epoch": sched.epoch_of(step),
                "data": {
                    "epoch": epoch,
                    "batch": batch_idx,
                    "micro_batch": cfg.micro_batch,
                    "world_size": info.world_size,
                    "accum": accum,
                },
                "counters": {"nonfinite_total": nonfinite_total, "nonfinite_streak": streak},
                "rng": rngs,
                "config": cfg.to_dict(),
                "model_config": tok_cfg.to_dict(),
            }
            path = ckpt.save_checkpoint(run.run_dir, state, step, keep_last=cfg.keep_last)
            if final and cfg.export:
                ema.copy_to(ema_tok)
                export = {
                    k: v for k, v in ema_tok.state_dict().items() if not k.startswith("semantic_decoder.")
                }
                ckpt.export_safetensors(
                    run.run_dir / "tokenizer_ema.safetensors",
                    export,
                    {**tok_cfg.to_dict(), "semantic_dim": 0},
                    step=step,
                    stage=cfg.stage,
                    train_config=cfg.to_dict(),
                )
            run.print(f"saved {path}")
        D.barrier()

    def images(tag: str) -> dict[str, float]:
        """Reconstruction grid (originals / model / EMA) and held-out PSNR; rank 0 only."""
        if not info.is_main:
            return {}
        ema.copy_to(ema_tok)
        tok.eval()
        x01 = eval_x * 0.5 + 0.5
        rec, rec_ema = reconstruct(tok, eval_x), reconstruct(ema_tok, eval_x)
        tok.train()
        n = min(8, len(eval_x))
        save_grid([x01[:n], rec[:n], rec_ema[:n]], run.run_dir / "images" / f"recon_{tag}.png")
        return {"psnr": psnr(rec, x01), "psnr_ema": psnr(rec_ema, x01)}

    # ---- loop
    tok.train()
    if teacher is not None:
        teacher.eval()
    nan_steps = cfg.nan_steps()
    first_eval = images(f"{step:07d}")
    run.print(f"held-out PSNR at step {step}: {first_eval}")
    history: list[float] = []
    start_step, t_start = step, time.time()
    bar = None
    if info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sched.total, initial=step, desc=f"{cfg.stage}", dynamic_ncols=True)
    while step < sched.total:
        batches = epoch_batches(loader, epoch, batch_idx)
        while step < sched.total and batch_idx + accum <= sched.steps_per_epoch * accum:
            # -------- one optimizer step = `accum` micro-batches
            lr = sched.lr(step)
            set_lr(opt, lr)
            gan_on = disc is not None and sched.epoch_of(step) >= cfg.loss.gan_start_epoch
            if gan_on:
                set_lr(opt_d, lr)
            sums: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                x = next(batches)["image"].to(device, non_blocking=True)
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync or not info.enabled else fwd.no_sync():
                    with run.autocast():
                        if stage1:
                            out = fwd(x)
                            x_hat, post, sem = out.images, out.posterior, out.semantic
                            target = teacher(x) if teacher is not None else None
                        else:
                            with torch.no_grad():
                                moments = tok.encoder(x)
                            post, sem, target = None, None, None
                            z = DiagonalGaussian(moments.float()).sample()  # no noise, no masking
                            x_hat = fwd(z)
                    terms = tokenizer_loss(
                        x * 0.5 + 0.5,
                        x_hat.float() * 0.5 + 0.5,
                        weights,
                        perceptual=perceptual,
                        posterior=post,
                        semantic_pred=sem,
                        semantic_target=target,
                        discriminator=disc.discriminator if gan_on else None,
                    )
                    if step in nan_steps:  # testing hook: a poisoned step
                        terms["loss"] = terms["loss"] * float("nan")
                    scaler.scale(terms["loss"] / accum).backward()
                if gan_on:
                    with contextlib.nullcontext() if sync or not info.enabled else disc_fwd.no_sync():
                        d_terms = disc_fwd(x * 0.5 + 0.5, x_hat.detach().float() * 0.5 + 0.5)
                        scaler_d.scale(d_terms["d_loss"] / accum).backward()
                    terms = {**terms, **d_terms}
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
                batch_idx += 1

            # -------- update (skipped on any rank's non-finite loss or grad norm)
            bad = nonfinite_any(*sums.values())
            gnorm, bad = optimizer_step(opt, scaler, g_params, cfg.optim.grad_clip, skip=bad)
            if gan_on:
                dnorm, d_bad = optimizer_step(opt_d, scaler_d, d_params, cfg.optim.grad_clip, skip=bad)
                sums["grad_norm_d"], bad = dnorm, bad or d_bad
            if bad:
                nonfinite_total, streak = nonfinite_total + 1, streak + 1
                run.print(
                    f"step {step}: non-finite loss or grad norm, update skipped "
                    f"({streak} in a row, {nonfinite_total} total)"
                )
                if streak >= cfg.max_nonfinite:
                    raise NonFiniteLossError(nonfinite_message(step, streak, cfg, run))
            else:
                streak = 0
                ema.update(tok)
            step += 1
            means = (
                {k: D.all_reduce_mean(v).item() for k, v in sums.items()}
                if (step % max(cfg.log_every, 1) == 0 or step == sched.total)
                else None
            )
            history.append(D.all_reduce_mean(sums["loss"]).item())

            # -------- hooks
            if means is not None:
                ips = cfg.global_batch * (step - start_step) / (time.time() - t_start)
                run.log(
                    step,
                    {
                        **means,
                        "lr": lr,
                        "grad_norm": gnorm.item(),
                        "epoch": sched.epoch_of(step),
                        "images_per_s": ips,
                        "nonfinite_total": nonfinite_total,
                    },
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
            if bar is not None:
                bar.update(1)
            if cfg.image_every and step % cfg.image_every == 0 and step < sched.total:
                images(f"{step:07d}")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < sched.total:
                save()
        if batch_idx + accum > sched.steps_per_epoch * accum:  # epoch done (leftover micro-batches dropped)
            epoch, batch_idx = epoch + 1, 0
        batches.close()
    if bar is not None:
        bar.close()
    last_eval = images(f"{step:07d}")
    save(final=True)
    return {
        "history": history,
        "start_step": start_step,
        "step": step,
        "eval_start": first_eval,
        "eval_end": last_eval,
        "nonfinite_total": nonfinite_total,
        "wall_s": time.time() - t_start,
        "model": tok,  # the bare module (for tests and notebooks)
        "ema": ema,
    }


# ============================================================================ DiT^DH
@torch.no_grad()
def latent_statistics(
    tok: nn.Module, cfg: TrainConfig, run: Run, root: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [C] of the posterior mean over the training set (no flip, center crop),
    accumulated in float64 over all ranks (SPEC section 6)."""
    from rectok.data import build_loader

    loader = build_loader(
        root,
        split=_split(root, "train"),
        batch_size=cfg.micro_batch,
        image_size=tok.cfg.img_size,
        train=False,
        hflip=False,
        rank=run.info.rank,
        world_size=run.info.world_size,
        num_workers=cfg.data.num_workers,
        device=run.device,
    )
    C = tok.cfg.token_channels
    acc = torch.zeros(2 * C + 1, dtype=torch.float64, device=run.device)  # sum, sum of squares, count
    for i, batch in enumerate(loader):
        if cfg.dit.stats_batches and i >= cfg.dit.stats_batches:
            break
        with run.autocast():
            moments = tok.encoder(batch["image"].to(run.device))
        mean = moments[..., :C].double().reshape(-1, C)  # (B * L, C)
        acc[:C] += mean.sum(0)
        acc[C : 2 * C] += mean.square().sum(0)
        acc[-1] += mean.shape[0]
    D.all_reduce_sum_(acc)
    mu = acc[:C] / acc[-1]
    std = (acc[C : 2 * C] / acc[-1] - mu.square()).clamp_min(1e-12).sqrt()
    return mu.float(), std.float()


class CachedMoments:
    """Posterior moments cached once per training image, plain and flipped, in a float16 .npy
    [N, 2, L, 2C]. Batches follow the image loader's ShardedSampler order, and a sample is flipped
    exactly when the image loader would flip it (rng(seed, epoch, index) draws first), so training
    sees the same distribution as encoding every step."""

    def __init__(
        self,
        path: Path,
        labels: list[int],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hflip: bool,
    ) -> None:
        from rectok.data import ShardedSampler

        self.moments = np.load(path, mmap_mode="r")
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.sampler = ShardedSampler(len(labels), rank, world_size, True, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        idx = self.sampler.indices(epoch)
        for b in range(len(idx) // self.batch_size):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            flips = [
                int(self.hflip and np.random.default_rng([self.seed, epoch, i]).random() < 0.5) for i in chunk
            ]
            moments = torch.from_numpy(
                np.stack([self.moments[i, f] for i, f in zip(chunk, flips)]).astype(np.float32)
            )
            yield {"moments": moments, "label": self.labels[chunk]}


@torch.no_grad()
def build_latent_cache(tok: nn.Module, cfg: TrainConfig, run: Run, root: Path, tag: str) -> Path:
    """Encode every training image once (plain and flipped) into cache_dir/moments_<tag>.npy; ranks write
    disjoint rows of one memory-mapped file. Reused when complete (marker file)."""
    from rectok.data import build_loader

    cache_dir = Path(cfg.dit.cache_dir or run.run_dir / "latent_cache")
    path, marker = cache_dir / f"moments_{tag}.npy", cache_dir / f"moments_{tag}.done"
    if marker.is_file():
        return path
    loader = build_loader(
        root,
        split=_split(root, "train"),
        batch_size=cfg.micro_batch,
        image_size=tok.cfg.img_size,
        train=False,
        hflip=False,
        rank=run.info.rank,
        world_size=run.info.world_size,
        num_workers=cfg.data.num_workers,
        device=run.device,
    )
    n, L, C2 = len(loader.samples), tok.cfg.seq_len, 2 * tok.cfg.token_channels
    if run.info.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 2, L, C2)).flush()
    D.barrier()
    out = np.load(path, mmap_mode="r+")
    for batch in loader:
        x = batch["image"].to(run.device)
        with run.autocast():
            both = torch.stack([tok.encoder(x), tok.encoder(x.flip(-1))], 1)  # (B, 2, L, 2C)
        out[batch["index"].numpy()] = both.float().cpu().numpy().astype(np.float16)
    out.flush()
    del out
    D.barrier()
    if run.info.is_main:
        marker.write_text(json.dumps({"images": n, "tokens": L, "channels": C2}))
    D.barrier()
    return path


def train_dit(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """DiT^DH on the frozen tokenizer's latents: t = 1 is data, x_t = t x + (1 - t) eps, target x - eps,
    u ~ U(0, 1), t = 1 - s u / (1 + (s - 1) u) with the tokenizer's shift s (SPEC section 6)."""
    from rectok.dit import DiTDH, LatentNormalizer, dit_config
    from rectok.sampling import euler_sample
    from rectok.tokenizer import DiagonalGaussian

    device, info = run.device, run.info
    seed_everything(cfg.seed)

    # ---- frozen tokenizer (EMA weights), data, latent statistics
    tok, _ = load_tokenizer(cfg.dit.tokenizer_ckpt, device, use_ema=True)
    tok.eval().requires_grad_(False)
    tcfg = tok.cfg
    C, grid = tcfg.token_channels, tcfg.grid_size
    shift = cfg.dit.time_shift or flow.timestep_shift(grid, grid, C)
    root = data_root(cfg, run)
    image_loader = train_loader(cfg, run, root, tcfg.img_size)
    classes = image_loader.samples.classes
    num_classes = cfg.dit.num_classes or (len(classes) if classes else 0)
    if num_classes < 1:
        raise ValueError("the dataset has no class folders: pass --dit.num_classes")

    resume = ckpt.resolve_resume(cfg.resume, run.run_dir)
    state = ckpt.load_checkpoint(resume) if resume is not None else None
    if state is not None:
        mu, std = state["latent_stats"]["mean"], state["latent_stats"]["std"]
    else:
        mu, std = latent_statistics(tok, cfg, run, root)
        if info.is_main:
            ckpt.export_safetensors(
                run.run_dir / "latent_stats.safetensors",
                {"mean": mu, "std": std},
                {"token_channels": C, "grid": grid},
                tokenizer=str(cfg.dit.tokenizer_ckpt),
            )
    normalizer = LatentNormalizer(mu, std).to(device)
    run.print(
        f"latent statistics: channel-mean mean {mu.mean():.4f}, std {std.mean():.4f}; shift s = {shift:.3f}"
    )

    loader = image_loader
    if cfg.dit.cache_latents:
        tag = ckpt.sha256(run.run_dir / "latent_stats.safetensors")[:12] if info.is_main else None
        tag = D.broadcast_object(tag)
        cache = build_latent_cache(tok, cfg, run, root, tag)
        loader = CachedMoments(
            cache,
            image_loader.samples.labels,
            cfg.micro_batch,
            info.rank,
            info.world_size,
            cfg.seed,
            cfg.data.hflip,
        )

    # ---- model, EMA, optimizer
    dcfg = dit_config(
        cfg.dit.preset,
        in_channels=C,
        grid_size=grid,
        num_classes=num_classes,
        label_dropout=cfg.dit.label_dropout,
    )
    dit = DiTDH(dcfg).to(device)
    run.print(
        f"DiT^DH {cfg.dit.preset}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters, "
        f"{num_classes} classes, latents [{C}, {grid}, {grid}]"
    )
    use_scaler = run.amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    fsdp = cfg.dit.parallel == "fsdp" and info.enabled
    if fsdp:
        D.shard_fsdp(dit, [*dit.trunk_blocks, *dit.head_blocks])
    ema = EMA(dit, cfg.optim.ema_decay)  # after sharding: under FSDP the average is sharded too
    opt = build_adamw(dit, cfg.base_lr(), cfg.optim.weight_decay, (cfg.optim.beta1, cfg.optim.beta2))
    if cfg.compile:
        compile_blocks(dit)
    fwd = dit if fsdp else D.wrap_ddp(dit, info)
    accum = cfg.grad_accum(info.world_size)
    sched = Schedule(cfg, len(loader), accum)

    # ---- resume
    seed_everything(cfg.seed * 1000 + info.rank)
    step, epoch, batch_idx, nonfinite_total, streak = 0, 0, 0, 0, 0
    if state is not None:
        warn_config_changes(state["config"], cfg, run)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True)  # every rank passes the full dict, keeps its shard
            set_model_state_dict(dit, state["model"], options=full)
            set_optimizer_state_dict(dit, opt, state["optimizer"], options=full)
        else:
            dit.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        epoch, batch_idx = data_position(state, sched, run, cfg)
        nonfinite_total, streak = state["counters"]["nonfinite_total"], state["counters"]["nonfinite_streak"]
        restore_rng(state.get("rng"), run)
        run.print(f"resumed from {resume} at step {step} (epoch {epoch}, batch {batch_idx})")

    def ema_state() -> dict:
        e = ema.state_dict()
        return {
            **e,
            "params": {k: D.full_tensor(v).cpu() for k, v in e["params"].items()},
            "buffers": {k: D.full_tensor(v).cpu() for k, v in e["buffers"].items()},
        }

    def save(final: bool = False) -> None:
        rngs = rng_states()
        model_sd = D.full_state_dict(dit)
        ema_sd = ema_state()
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_sd = get_optimizer_state_dict(
                dit, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            opt_sd = opt.state_dict()
        if info.is_main:
            state = {
                "model": model_sd,
                "ema": ema_sd,
                "optimizer": opt_sd,
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": sched.epoch_of(step),
                "data": {
                    "epoch": epoch,
                    "batch": batch_idx,
                    "micro_batch": cfg.micro_batch,
                    "world_size": info.world_size,
                    "accum": accum,
                },
                "counters": {"nonfinite_total": nonfinite_total, "nonfinite_streak": streak},
                "rng": rngs,
                "config": cfg.to_dict(),
                "model_config": asdict(dcfg),
                "latent_stats": {"mean": mu.cpu(), "std": std.cpu()},
                "tokenizer": str(cfg.dit.tokenizer_ckpt),
                "time_shift": shift,
            }
            path = ckpt.save_checkpoint(run.run_dir, state, step, keep_last=cfg.keep_last)
            if final and cfg.export:
                weights = {**ema_sd["params"], **ema_sd["buffers"]}
                export = {k: weights[k] for k in model_sd}
                ckpt.export_safetensors(
                    run.run_dir / "dit_ema.safetensors",
                    export,
                    asdict(dcfg),
                    step=step,
                    latent_mean=mu.tolist(),
                    latent_std=std.tolist(),
                    time_shift=shift,
                    tokenizer=str(cfg.dit.tokenizer_ckpt),
                    train_config=cfg.to_dict(),
                )
            run.print(f"saved {path}")
        D.barrier()

    sample_gen = torch.Generator(device).manual_seed(1234)
    n_show = min(8, cfg.data.eval_images)
    sample_noise = torch.randn(n_show, C, grid, grid, generator=sample_gen, device=device)
    sample_labels = torch.arange(n_show, device=device) % num_classes
    ema_dit = None if fsdp else copy.deepcopy(dit).eval().requires_grad_(False)

    def images(tag: str) -> None:
        """Euler samples of the EMA model (fixed noise and labels), decoded by the tokenizer; rank 0."""
        if not info.is_main or ema_dit is None:
            return
        ema.copy_to(ema_dit)
        with run.autocast():
            z = euler_sample(
                ema_dit, sample_noise, sample_labels, num_points=cfg.dit.sample_steps, shift=shift
            )
            z = normalizer.denormalize(z.float()).flatten(2).transpose(1, 2)  # (B, L, C)
            imgs = tok.decode(z).float()
        save_grid([imgs], run.run_dir / "images" / f"samples_{tag}.png")

    # ---- loop
    nan_steps = cfg.nan_steps()
    history: list[float] = []
    start_step, t_start = step, time.time()
    images(f"{step:07d}")
    bar = None
    if info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sched.total, initial=step, desc="dit", dynamic_ncols=True)
    dit.train()
    while step < sched.total:
        batches = epoch_batches(loader, epoch, batch_idx)
        while step < sched.total and batch_idx + accum <= sched.steps_per_epoch * accum:
            lr = sched.lr(step)
            set_lr(opt, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                batch = next(batches)
                y = batch["label"].to(device)
                if "moments" in batch:
                    moments = batch["moments"].to(device)
                else:
                    with torch.no_grad(), run.autocast():
                        moments = tok.encoder(batch["image"].to(device))
                z = DiagonalGaussian(moments.float()).sample()  # (B, L, C) posterior sample
                B = z.shape[0]
                x1 = normalizer.normalize(z.transpose(1, 2).reshape(B, C, grid, grid))  # data, t = 1
                eps = torch.randn(x1.shape, device=device)
                t = 1.0 - flow.shift_tau(torch.rand(B, device=device), shift)
                x_t = kernels.flow_interpolate(eps, x1, t)  # t * x1 + (1 - t) * eps
                sync = micro == accum - 1 or fsdp or not info.enabled
                with contextlib.nullcontext() if sync else fwd.no_sync():
                    with run.autocast():
                        v = fwd(x_t, t, y)
                    loss = kernels.velocity_mse(v.float(), x1, eps)
                    if step in nan_steps:
                        loss = loss * float("nan")
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach() / accum
                batch_idx += 1

            bad = nonfinite_any(loss_sum)
            gnorm, bad = optimizer_step(opt, scaler, list(dit.parameters()), cfg.optim.grad_clip, skip=bad)
            if bad:
                nonfinite_total, streak = nonfinite_total + 1, streak + 1
                run.print(
                    f"step {step}: non-finite loss or grad norm, update skipped "
                    f"({streak} in a row, {nonfinite_total} total)"
                )
                if streak >= cfg.max_nonfinite:
                    raise NonFiniteLossError(nonfinite_message(step, streak, cfg, run))
            else:
                streak = 0
                ema.update(dit)
            step += 1
            loss_mean = D.all_reduce_mean(loss_sum).item()
            history.append(loss_mean)
            if step % max(cfg.log_every, 1) == 0 or step == sched.total:
                ips = cfg.global_batch * (step - start_step) / (time.time() - t_start)
                run.log(
                    step,
                    {
                        "loss": loss_mean,
                        "lr": lr,
                        "grad_norm": float(D.full_tensor(gnorm)),
                        "epoch": sched.epoch_of(step),
                        "images_per_s": ips,
                        "nonfinite_total": nonfinite_total,
                    },
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.2e}")
            if bar is not None:
                bar.update(1)
            if cfg.image_every and step % cfg.image_every == 0 and step < sched.total:
                images(f"{step:07d}")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < sched.total:
                save()
        if batch_idx + accum > sched.steps_per_epoch * accum:
            epoch, batch_idx = epoch + 1, 0
        batches.close()
    if bar is not None:
        bar.close()
    images(f"{step:07d}")
    save(final=True)
    return {
        "history": history,
        "start_step": start_step,
        "step": step,
        "nonfinite_total": nonfinite_total,
        "wall_s": time.time() - t_start,
        "model": dit,  # the bare module (sharded under FSDP)
        "ema": ema,
    }


# ============================================================================ entry point
def write_summary(run: Run, cfg: TrainConfig, result: dict[str, Any]) -> None:
    """metrics.json: loss at the start and end of this run (mean of the first / last 10 steps), held-out
    PSNR before and after (tokenizer stages), steps, wall time."""
    if not run.info.is_main:
        return
    h = [v for v in result["history"] if math.isfinite(v)]
    k = min(10, max(len(h) // 2, 1))
    summary = {
        "stage": cfg.stage,
        "preset": cfg.preset,
        "steps": result["step"],
        "steps_this_run": len(result["history"]),
        "loss_start": float(np.mean(h[:k])) if h else None,
        "loss_end": float(np.mean(h[-k:])) if h else None,
        "nonfinite_steps": result["nonfinite_total"],
        "wall_s": round(result["wall_s"], 1),
        "images_per_s": round(cfg.global_batch * len(result["history"]) / max(result["wall_s"], 1e-9), 2),
    }
    if "eval_start" in result:
        summary["heldout_psnr_start"] = result["eval_start"]
        summary["heldout_psnr_end"] = result["eval_end"]
        summary["heldout_images"] = cfg.data.eval_images
    ckpt.atomic_write(run.run_dir / "metrics.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    run.print("summary: " + json.dumps(summary))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    run = Run(cfg)
    try:
        result = train_dit(cfg, run) if cfg.stage == "dit" else train_tokenizer(cfg, run)
        write_summary(run, cfg, result)
        return result
    finally:
        run.close()
        D.shutdown()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(3)
    except ValueError as err:  # bad configuration or data: a message, not a traceback
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(2)
