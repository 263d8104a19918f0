"""Stage 1: the tokenizer trained with FSD + RAD (SPEC sections 2, 4, 5): masking, posterior sample,
forward flow, both decoders, and every loss term against the frozen teacher's features."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rectok.models.flow import FlowDraws
from rectok.models.teacher import Teacher
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.training.config import TokenizerTrainConfig, TrainConfig
from rectok.training.ema import EMA
from rectok.training.losses import LossWeights, PerceptualLoss, semantic_token_ids, tokenizer_loss
from rectok.training.runtime import Run, seed_everything
from rectok.training.tokenizer_training import TokenizerTraining


def build_teacher(t: TokenizerTrainConfig, image_size: int, token_patch: int) -> Teacher:
    """The frozen teacher of `--tok.teacher` (its weights from --tok.teacher_weights, or the local hub
    cache; the tiny one is random unless given weights), its features on the tokenizer's grid."""
    if t.teacher == "tiny":
        return Teacher.tiny(
            t.teacher_weights or "random",
            image_size=image_size,
            token_patch=token_patch,
            targets=t.teacher_targets,
        )
    return Teacher(
        t.teacher,
        t.teacher_weights or None,
        image_size=image_size,
        token_patch=token_patch,
        targets=t.teacher_targets,
    )


def new_tokenizer(
    t: TokenizerTrainConfig, semantic: bool, device: torch.device
) -> tuple[RecTok, Teacher | None]:
    """A fresh RecTok of preset `t.preset` with the run's flow and masking options, and its teacher
    (None without the semantic loss); the semantic decoder is sized for the teacher's features."""
    overrides: dict[str, Any] = {"token_channels": t.token_channels} if t.token_channels else {}
    if t.img_size:
        overrides["img_size"] = t.img_size
    teacher = None
    if semantic:
        base = tokenizer_config(t.preset, **overrides)
        teacher = build_teacher(t, base.img_size, base.patch_size).to(device)
    config = tokenizer_config(
        t.preset,
        **overrides,
        semantic_dim=teacher.feature_dim if teacher is not None else 0,
        mask_ratio_min=t.mask_ratio_min,
        mask_ratio_max=t.mask_ratio_max,
        noise_schedule=t.noise_schedule,
        timestep_shift=t.timestep_shift or None,
        gamma=t.gamma,
        semantic_flow=t.semantic_flow,
    )
    return RecTok(config).to(device), teacher


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
    semantic_tokens: str = "all",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One stage-1 micro-batch: tokenizer forward (masking, posterior sample, forward flow, both
    decoders), teacher targets and every generator-side loss term. x: images [B, 3, H, W] in
    [-1, 1]; tok may be DDP-wrapped. `draws` / `rope_rescale` inject the random draws (parity
    tests); by default they are drawn, the tokenizer's first and the teacher's last, as the
    release does. `semantic_tokens`: the tokens the semantic loss covers (all, or the ablations
    visible / masked). The networks run under `autocast`, the losses outside it in float32 (as the
    release's loss module). Returns (terms of rectok.training.losses.tokenizer_loss, decoder output)."""
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
        semantic_tokens=semantic_token_ids(out.mask, semantic_tokens) if out.mask is not None else None,
        discriminator=discriminator,
    )
    return terms, out.images


def train_tokenizer(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """Stage 1 from scratch; returns TokenizerTraining.finish's summary (loss history, held-out PSNR,
    steps, wall time, the bare model and its EMA)."""
    seed_everything(cfg.seed)  # same initial weights on every rank
    tok, teacher = new_tokenizer(cfg.tok, cfg.loss.semantic > 0, run.device)
    n_params = sum(p.numel() for p in tok.parameters())
    run.print(
        f"tokenizer {cfg.tok.preset}: {n_params / 1e6:.2f}M trainable parameters, C = "
        f"{tok.cfg.token_channels}, {tok.cfg.img_size} px, teacher {getattr(teacher, 'model_name', None)}"
    )
    training = TokenizerTraining(cfg, run, tok, trained=tok, ema=EMA(tok, cfg.optim.ema_decay))
    tok.train()
    if teacher is not None:
        # The release trains with its teacher in train mode (DINOv3's RoPE rescale); "clean" targets
        # keep it in eval mode.
        teacher.train(cfg.tok.teacher_targets == "release")

    for batches in training.steps(desc="tokenizer"):
        for micro in range(training.accum):
            x = next(batches)["image"].to(run.device, non_blocking=True)
            with training.sync(micro):
                terms, x_hat = stage1_losses(
                    training.fwd,
                    teacher,
                    x,
                    training.weights,
                    perceptual=training.perceptual,
                    discriminator=training.critic,
                    semantic_tokens=cfg.loss.semantic_tokens,
                    autocast=run.autocast,
                )
                terms = training.backward(terms)
            training.accumulate(terms, training.train_discriminator(micro, x, x_hat))
        training.finish_step()
    return training.finish()
