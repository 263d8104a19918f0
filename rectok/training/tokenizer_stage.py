"""Tokenizer training: stage 1 (FSD + RAD: masking, posterior sample, forward flow, both decoders,
all losses; SPEC sections 2, 4, 5) and stage 2 (pixel decoder only: frozen encoder, no
noise / masking / KL / semantics / teacher, a fresh discriminator)."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rectok.checkpoints import loading as model_io
from rectok.checkpoints import store
from rectok.eval.image_metrics import psnr
from rectok.models.discriminator import PatchDiscriminator
from rectok.models.flow import FlowDraws
from rectok.models.tokenizer import DiagonalGaussian, RecTok, make_config
from rectok.training import distributed as D
from rectok.training.batches import (
    bad_image_indices,
    data_root,
    held_out_images,
    restore_bad_images,
    skipped_training_images,
    step_batches,
    train_loader,
)
from rectok.training.config import TrainConfig
from rectok.training.ema import EMA
from rectok.training.losses import DiscriminatorLoss, LossWeights, PerceptualLoss, tokenizer_loss
from rectok.training.optim import build_adamw, set_lr
from rectok.training.progress import Position, Schedule, StepMeter
from rectok.training.reports import save_image_rows
from rectok.training.runtime import (
    Run,
    compile_blocks,
    nonfinite_any,
    optimizer_step,
    rng_states,
    seed_everything,
)

STAGE1_HINT = "Train a tokenizer first (stage 1): `python train.py` writes runs/demo."


def load_tokenizer(
    path: str | os.PathLike, device: torch.device, use_ema: bool = True, verify: str = "full"
) -> tuple[RecTok, dict | None]:
    """A tokenizer (semantic decoder dropped) from one of this project's checkpoints (.pt, a run folder,
    or an exported .safetensors) or an official-layout file, on `device`; also returns its checkpoint's
    EMA state (None for weight files), which the decoder stage continues."""
    loaded = model_io.load_tokenizer(path, use_ema=use_ema, hint=STAGE1_HINT, keep_ema=True, verify=verify)
    return loaded.model.to(device), loaded.raw.get("ema")


def _drop_semantic(ema_state: dict) -> dict:
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("semantic_decoder.")}  # noqa: E731
    return {**ema_state, "params": keep(ema_state["params"]), "buffers": keep(ema_state["buffers"])}


def build_teacher(cfg: TrainConfig, tok_cfg, device: torch.device):
    from rectok.models.teacher import Teacher

    t = cfg.tok
    weights = t.teacher_weights or None
    if t.teacher == "tiny":
        teacher = Teacher.tiny(
            weights or "random",
            image_size=tok_cfg.img_size,
            token_patch=tok_cfg.patch_size,
            targets=t.teacher_targets,
        )
    else:
        teacher = Teacher(
            t.teacher,
            weights,
            image_size=tok_cfg.img_size,
            token_patch=tok_cfg.patch_size,
            targets=t.teacher_targets,
        )
    return teacher.to(device)


def build_tokenizer(cfg: TrainConfig, device: torch.device) -> tuple[RecTok, nn.Module | None, dict | None]:
    """(tokenizer, teacher or None, EMA state to continue or None). Stage 1: a fresh RecTok sized for
    the teacher's features. Stage 2: the stage-1 weights with only the pixel decoder trainable, and
    stage 1's EMA (the release continues it)."""
    overrides: dict[str, Any] = {}
    if cfg.tok.token_channels:
        overrides["token_channels"] = cfg.tok.token_channels
    if cfg.stage != "tokenizer":
        tok, init_ema = load_tokenizer(cfg.tok.init_from, device, use_ema=False, verify=cfg.ckpt_verify)
        tok.requires_grad_(False)
        tok.pixel_decoder.requires_grad_(True)
        return tok, None, _drop_semantic(init_ema) if init_ema else None
    teacher = None
    if cfg.loss.semantic > 0:
        teacher = build_teacher(cfg, make_config(cfg.tok.preset, **overrides), device)
    overrides["semantic_dim"] = teacher.feature_dim if teacher is not None else 0
    overrides.update(
        mask_ratio_min=cfg.tok.mask_ratio_min,
        mask_ratio_max=cfg.tok.mask_ratio_max,
        noise_schedule=cfg.tok.noise_schedule,
        timestep_shift=cfg.tok.timestep_shift or None,
        gamma=cfg.tok.gamma,
    )
    return RecTok(make_config(cfg.tok.preset, **overrides)).to(device), teacher, None


def stage1_losses(
    tok: nn.Module,
    teacher: nn.Module | None,
    x: torch.Tensor,
    weights: LossWeights,
    *,
    perceptual: PerceptualLoss | None,
    discriminator: nn.Module | None,
    draws: FlowDraws | None = None,
    rope_rescale: torch.Tensor | float | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One stage-1 micro-batch: tokenizer forward (masking, posterior sample, forward flow, both
    decoders), teacher targets and every generator-side loss term. x: images [B, 3, H, W] in
    [-1, 1]; tok may be DDP-wrapped. `draws` / `rope_rescale` inject the random draws (parity
    tests); by default they are drawn, the tokenizer's first and the teacher's last, as the
    release does. The networks run under `autocast`, the losses outside it in float32 (as the
    release's loss module). Returns (terms of rectok.losses.tokenizer_loss, decoder output)."""
    with autocast():
        out = tok(x) if draws is None else tok(x, draws=draws)
        target = teacher(x, rope_rescale=rope_rescale) if teacher is not None else None
    terms = tokenizer_loss(
        x * 0.5 + 0.5,
        out.images.float() * 0.5 + 0.5,
        weights,
        perceptual=perceptual,
        posterior=out.posterior,
        semantic_pred=out.semantic,
        semantic_target=target,
        discriminator=discriminator,
    )
    return terms, out.images


def train_tokenizer(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """Stage 1 (cfg.stage "tokenizer") or stage 2 ("decoder"); returns the loss history, step counts,
    held-out PSNR at the start and end (and how many held-out images were used / unreadable), the
    unreadable training images skipped, wall time, and the bare model and its EMA."""
    stage1 = cfg.stage == "tokenizer"
    device, info = run.device, run.info
    seed_everything(cfg.seed)  # same initial weights on every rank

    # ---- models: tokenizer (+ teacher), EMA, losses
    tok, teacher, init_ema_state = build_tokenizer(cfg, device)
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
    held_out = held_out_images(cfg, root, tok_cfg.img_size)
    if held_out.skipped:
        run.print(held_out.warning())
    eval_x = held_out.images.to(device)

    # ---- wrappers (applied from outside; the bare modules are what gets saved)
    trained = tok if stage1 else tok.pixel_decoder
    if cfg.compile:
        compile_blocks(tok)
    fwd = D.wrap_ddp(trained, info)
    disc_fwd = D.wrap_ddp(disc, info) if disc is not None else None

    # ---- resume
    seed_everything(cfg.seed * 1000 + info.rank)
    pos = Position()
    resume, state = store.resolve_resume(cfg.resume, run.run_dir, cfg.ckpt_verify)
    if resume is not None:
        tok.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if disc is not None and state.get("disc") is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["disc_optimizer"])
            scaler_d.load_state_dict(state["disc_scaler"])
        pos = Position.resume(state, resume, sched, run, cfg)
        restore_bad_images(loader, state)

    ema_tok = copy.deepcopy(tok).eval().requires_grad_(False)

    def save(final: bool = False) -> None:
        rngs, bad_images = rng_states(), bad_image_indices(loader)  # both collective
        if info.is_main:
            state = {
                "model": D.unwrap(tok).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "disc": disc.state_dict() if disc is not None else None,
                "disc_optimizer": opt_d.state_dict() if opt_d is not None else None,
                "disc_scaler": scaler_d.state_dict(),
                **pos.checkpoint_entries(sched, run, cfg),
                "rng": rngs,
                "bad_images": bad_images,
                "environment": run.environment,
                "config": cfg.to_dict(),
                "model_config": tok_cfg.to_dict(),
            }
            path = store.save_checkpoint(run.run_dir, state, pos.step, keep_last=cfg.keep_last)
            if final and cfg.export:
                ema.copy_to(ema_tok)
                export = {
                    k: v for k, v in ema_tok.state_dict().items() if not k.startswith("semantic_decoder.")
                }
                store.export_safetensors(
                    run.run_dir / "tokenizer_ema.safetensors",
                    export,
                    {**tok_cfg.to_dict(), "semantic_dim": 0},
                    step=pos.step,
                    stage=cfg.stage,
                    train_config=cfg.to_dict(),
                )
            run.print(f"saved {path}")
        D.barrier()

    def images(tag: str) -> dict[str, float]:
        """Reconstruction grid (originals / model / EMA) and mean held-out PSNR; rank 0 only."""
        if not info.is_main:
            return {}
        ema.copy_to(ema_tok)
        tok.eval()
        x01 = eval_x * 0.5 + 0.5
        rec, rec_ema = tok.reconstruct(eval_x), ema_tok.reconstruct(eval_x)
        tok.train()
        n = min(8, len(eval_x))
        save_image_rows([x01[:n], rec[:n], rec_ema[:n]], run.run_dir / "images" / f"recon_{tag}.png")
        return {"psnr": float(psnr(rec, x01).mean()), "psnr_ema": float(psnr(rec_ema, x01).mean())}

    # ---- loop
    tok.train()
    if teacher is not None:
        # The release trains with its teacher in train mode (DINOv3's RoPE rescale); "clean" targets
        # keep it in eval mode.
        teacher.train(cfg.tok.teacher_targets == "release")
    nan_steps = cfg.nan_steps()
    first_eval = images(f"{pos.step:07d}")
    run.print(f"held-out PSNR at step {pos.step}: {first_eval}")
    history: list[float] = []
    meter = StepMeter(run, sched, pos.step, desc=cfg.stage)
    for batches in step_batches(loader, sched, pos):
        # -------- one optimizer step = `accum` micro-batches
        lr = sched.lr(pos.step)
        set_lr(opt, lr)
        gan_on = disc is not None and sched.epoch_of(pos.step) >= cfg.loss.gan_start_epoch
        if gan_on:
            set_lr(opt_d, lr)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            x = next(batches)["image"].to(device, non_blocking=True)
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync or not info.enabled else fwd.no_sync():
                critic = disc.discriminator if gan_on else None
                if stage1:
                    terms, x_hat = stage1_losses(
                        fwd,
                        teacher,
                        x,
                        weights,
                        perceptual=perceptual,
                        discriminator=critic,
                        autocast=run.autocast,
                    )
                else:
                    with run.autocast():
                        with torch.no_grad():
                            moments = tok.encoder(x)
                        z = DiagonalGaussian(moments.float()).sample()  # no noise, no masking
                        x_hat = fwd(z)
                    x01, x_hat01 = x * 0.5 + 0.5, x_hat.float() * 0.5 + 0.5
                    terms = tokenizer_loss(x01, x_hat01, weights, perceptual=perceptual, discriminator=critic)
                if pos.step in nan_steps:  # testing hook: a poisoned step
                    terms["loss"] = terms["loss"] * float("nan")
                scaler.scale(terms["loss"] / accum).backward()
            if gan_on:
                with contextlib.nullcontext() if sync or not info.enabled else disc_fwd.no_sync():
                    d_terms = disc_fwd(x * 0.5 + 0.5, x_hat.detach().float() * 0.5 + 0.5)
                    scaler_d.scale(d_terms["d_loss"] / accum).backward()
                terms = {**terms, **d_terms}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            pos.batch += 1

        # -------- update (skipped on any rank's non-finite loss or grad norm)
        bad = nonfinite_any(*sums.values())
        gnorm, bad = optimizer_step(opt, scaler, g_params, cfg.optim.grad_clip, skip=bad)
        if gan_on:
            dnorm, d_bad = optimizer_step(opt_d, scaler_d, d_params, cfg.optim.grad_clip, skip=bad)
            sums["grad_norm_d"], bad = dnorm, bad or d_bad
        pos.count_update(bad, cfg, run)
        if not bad:
            ema.update(tok)
        pos.step += 1
        step = pos.step
        log_now = step % max(cfg.log_every, 1) == 0 or step == sched.total
        means = {k: D.all_reduce_mean(v).item() for k, v in sums.items()} if log_now else None
        history.append(D.all_reduce_mean(sums["loss"]).item())

        # -------- hooks
        if means is not None:
            meter.log(step, means, lr, gnorm, pos.nonfinite_total)
        meter.update()
        if cfg.image_every and step % cfg.image_every == 0 and step < sched.total:
            images(f"{step:07d}")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < sched.total:
            save()
    meter.close()
    # Each unreadable file was logged by the loader when it was met; this is the run's total for
    # metrics.json (collective, so before the rank-0-only work below).
    skipped = skipped_training_images(loader)
    if skipped:
        run.print(f"warning: {skipped} unreadable training image(s) skipped (substituted) in this run")
    last_eval = images(f"{pos.step:07d}")
    save(final=True)
    return {
        "history": history,
        "start_step": meter.start_step,
        "step": pos.step,
        "eval_start": first_eval,
        "eval_end": last_eval,
        "heldout_images": len(eval_x),  # the images actually evaluated, unreadable ones left out
        "heldout_skipped": len(held_out.skipped),
        "skipped_images": skipped,
        "nonfinite_total": pos.nonfinite_total,
        "wall_s": meter.wall_s(),
        "model": tok,  # the bare module (for tests and notebooks)
        "ema": ema,
    }
