"""Stage 2: the pixel decoder fine-tuned on the frozen stage-1 encoder (the release's decoder
stage): no noise, masking, KL, semantics or teacher; a fresh discriminator; stage 1's EMA
continued."""

from __future__ import annotations

import os
from typing import Any

import torch

from rectok.checkpoints import loading
from rectok.models.tokenizer import DiagonalGaussian, RecTok
from rectok.training.config import TrainConfig
from rectok.training.ema import EMA
from rectok.training.losses import tokenizer_loss
from rectok.training.runtime import Run, seed_everything
from rectok.training.tokenizer_training import TokenizerTraining

STAGE1_HINT = "Train a tokenizer first (stage 1): `python train.py` writes runs/demo."


def load_stage1(
    path: str | os.PathLike, device: torch.device, verify: str = "full", img_size: int | None = None
) -> tuple[RecTok, dict | None]:
    """The stage-1 tokenizer's trained weights (not its EMA; semantic decoder dropped) from one of this
    project's checkpoints (.pt, a run folder, or an exported .safetensors) or an official-layout file,
    on `device`; also returns its checkpoint's EMA state without the semantic decoder (None for weight
    files), which the decoder stage continues."""
    loaded = loading.load_tokenizer(
        path, use_ema=False, hint=STAGE1_HINT, keep_ema=True, verify=verify, img_size=img_size
    )
    ema_state = loaded.raw.get("ema")
    if ema_state is not None:
        keep = lambda d: {k: v for k, v in d.items() if not k.startswith("semantic_decoder.")}  # noqa: E731
        ema_state = {**ema_state, "params": keep(ema_state["params"]), "buffers": keep(ema_state["buffers"])}
    return loaded.model.to(device), ema_state


def train_decoder(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """Stage 2 from the stage-1 checkpoint --tok.init_from; returns TokenizerTraining.finish's
    summary (loss history, held-out PSNR, steps, wall time, the bare model and its EMA)."""
    seed_everything(cfg.seed)  # same initial weights (the fresh discriminator) on every rank
    tok, stage1_ema = load_stage1(
        cfg.tok.init_from, run.device, verify=cfg.ckpt_verify, img_size=cfg.tok.img_size or None
    )
    tok.requires_grad_(False)
    tok.pixel_decoder.requires_grad_(True)
    ema = EMA(tok, cfg.optim.ema_decay)
    if stage1_ema is not None:  # the release continues stage 1's EMA in stage 2
        ema.load_state_dict({**stage1_ema, "decay": cfg.optim.ema_decay, "num_updates": 0})
    n_params = sum(p.numel() for p in tok.pixel_decoder.parameters())
    run.print(f"decoder stage from {cfg.tok.init_from}: {n_params / 1e6:.2f}M trainable parameters")
    training = TokenizerTraining(cfg, run, tok, trained=tok.pixel_decoder, ema=ema)
    tok.train()

    for batches in training.steps(desc="decoder"):
        for micro in range(training.accum):
            x = next(batches)["image"].to(run.device, non_blocking=True)
            with training.sync(micro):
                with run.autocast():
                    with torch.no_grad():
                        moments = tok.encoder(x)
                    z = DiagonalGaussian(moments.float()).sample()  # no noise, no masking
                    x_hat = training.fwd(z)
                terms = tokenizer_loss(
                    x * 0.5 + 0.5,
                    x_hat.float() * 0.5 + 0.5,
                    training.weights,
                    perceptual=training.perceptual,
                    discriminator=training.critic,
                )
                terms = training.backward(terms)
            training.accumulate(terms, training.train_discriminator(micro, x, x_hat))
        training.finish_step()
    return training.finish()
