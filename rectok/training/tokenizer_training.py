"""What the tokenizer's two stages share around their own loops (stage 1: tokenizer_stage.py, stage 2:
decoder_stage.py): the loss modules, the discriminator with its own optimizer, the data and held-out
images, resume, checkpoints and the EMA export, reconstruction grids, and everything after the
micro-batches of an optimizer step (the update of both networks, the EMA, logging, the hooks)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rectok.checkpoints import store
from rectok.eval.image_metrics import psnr
from rectok.models.discriminator import PatchDiscriminator
from rectok.models.layers import set_activation_checkpointing
from rectok.models.tokenizer import RecTok
from rectok.sampling.images import save_image_rows
from rectok.training import distributed as D
from rectok.training.batches import data_root, held_out_images, held_out_split, step_batches, train_loader
from rectok.training.compiling import compile_model
from rectok.training.config import TrainConfig
from rectok.training.ema import EMA
from rectok.training.latents import latent_statistics
from rectok.training.loop import (
    LossHistory,
    count_skipped_images,
    periodic_hooks,
    resume_position,
    run_entries,
    write_checkpoint,
)
from rectok.training.losses import DiscriminatorLoss, LossWeights, PerceptualLoss
from rectok.training.online_eval import CAVEAT, OnlineEvaluator
from rectok.training.optim import build_adamw, set_lr, use_fused
from rectok.training.progress import Position, Schedule, StepMeter
from rectok.training.runtime import (
    Run,
    nonfinite_flag,
    read_flags,
    seed_everything,
    step_or_skip,
    unscale_and_clip,
)


class TokenizerTraining:
    """One tokenizer stage's state: `tok` (the bare RecTok, saved whole), `trained` (the part that
    learns: the whole tokenizer in stage 1, its pixel decoder in stage 2), the EMA of `tok`, the loss
    modules, both optimizers, the data and the position. A stage's loop reads

        for batches in training.steps(desc):
            for micro in range(training.accum):
                x = next(batches)["image"].to(device, non_blocking=True)
                with training.sync(micro):
                    terms, x_hat = <the stage's loss>(training.fwd, x, ..., training.critic)
                    terms = training.backward(terms)
                training.accumulate(terms, training.train_discriminator(micro, x, x_hat))
            training.finish_step()
    """

    def __init__(self, cfg: TrainConfig, run: Run, tok: RecTok, trained: nn.Module, ema: EMA) -> None:
        self.cfg, self.run, self.tok, self.ema = cfg, run, tok, ema
        device, info = run.device, run.info
        lo = cfg.loss
        self.weights = LossWeights(lo.mse, lo.perceptual, lo.kl, lo.semantic, lo.gan)
        self.perceptual = None
        if lo.perceptual > 0:
            self.perceptual = PerceptualLoss(
                lo.perceptual_weights,
                lo.weights_dir or None,
                resize=lo.perceptual_resize,
                precision=lo.perceptual_precision,
                channels_last=lo.perceptual_channels_last,
            ).to(device)
        self.disc = None
        if lo.gan > 0:
            critic = PatchDiscriminator(ndf=lo.disc_ndf, n_layers=lo.disc_layers)
            self.disc = DiscriminatorLoss(critic).to(device)

        # Optimizers: the discriminator gets its own AdamW with the same schedule.
        o = cfg.optim
        betas = (o.beta1, o.beta2)
        fused = use_fused(o.fused, device)
        self.opt = build_adamw(tok, cfg.base_lr(), o.weight_decay, betas, fused)
        self.opt_d = None
        if self.disc is not None:
            self.opt_d = build_adamw(self.disc, cfg.base_lr(), o.weight_decay, betas, fused)
        use_scaler = run.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.g_params = [p for p in tok.parameters() if p.requires_grad]
        self.d_params = list(self.disc.parameters()) if self.disc is not None else []

        # Data
        self.root = root = data_root(cfg, run)
        self.loader = train_loader(cfg, run, root, tok.cfg.img_size)
        self.accum = cfg.grad_accum(info.world_size)
        self.sched = Schedule(cfg, len(self.loader), self.accum)
        self.held_out = held_out_images(cfg.data.eval_images, root, tok.cfg.img_size)
        if self.held_out.skipped:
            run.print(self.held_out.warning())
        self.eval_x = self.held_out.images.to(device)
        self.eval_every = round(cfg.eval_every * self.sched.steps_per_epoch) if cfg.eval_every else 0
        self.online = None
        if self.eval_every and info.is_main:
            self.online = OnlineEvaluator(
                root,
                held_out_split(root),
                cfg.data.online_eval_images,
                tok.cfg.img_size,
                device,
                run.run_dir,
                cfg.data.inception_weights,
                cfg.micro_batch,
                cfg.data.num_workers,
            )

        # Wrappers, applied from outside: the bare modules are what gets saved.
        if cfg.activation_checkpointing:
            set_activation_checkpointing(tok)
        if cfg.compile:
            compile_model(tok, cfg.compile_scope, mode=cfg.compile_mode)
            if self.perceptual is not None:  # frozen LPIPS + ConvNeXt: one graph (modules scope)
                compile_model(self.perceptual, cfg.compile_scope, mode=cfg.compile_mode)
        self.fwd = D.wrap_ddp(trained, info)
        self.disc_fwd = D.wrap_ddp(self.disc, info) if self.disc is not None else None

        seed_everything(cfg.seed * 1000 + info.rank)
        self.pos = Position()
        self._resume()
        self.ema_tok = copy.deepcopy(tok).eval().requires_grad_(False)
        self.nan_steps = cfg.nan_steps()
        self.history = LossHistory()
        self.gan_on = False
        self.lr = 0.0
        self.sums: dict[str, torch.Tensor] = {}

    def _resume(self) -> None:
        cfg = self.cfg
        path, state = store.resolve_resume(cfg.resume, self.run.run_dir, cfg.ckpt_verify)
        if path is None:
            return
        self.tok.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.disc is not None and state.get("disc") is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["disc_optimizer"])
            self.scaler_d.load_state_dict(state["disc_scaler"])
        self.pos = resume_position(state, path, self.sched, self.run, cfg, self.loader)

    # ------------------------------------------------------------------ the loop's pieces

    def steps(self, desc: str):
        """The held-out PSNR before the first step (and its grid), then, for every optimizer step, the
        iterator its micro-batches come from."""
        self.eval_start = self.reconstructions(f"{self.pos.step:07d}")
        self.run.print(f"held-out PSNR at step {self.pos.step}: {self.eval_start}")
        self.meter = StepMeter(self.run, self.sched, self.pos.step, desc=desc)
        for batches in step_batches(self.loader, self.sched, self.pos):
            self.lr = self.sched.lr(self.pos.step)
            set_lr(self.opt, self.lr)
            self.gan_on = (
                self.disc is not None and self.sched.epoch_of(self.pos.step) >= self.cfg.loss.gan_start_epoch
            )
            if self.gan_on:
                set_lr(self.opt_d, self.lr)
            self.sums = {}
            yield batches

    @property
    def critic(self) -> nn.Module | None:
        """The discriminator the generator's GAN term uses this step (None before loss.gan_start_epoch)."""
        return self.disc.discriminator if self.gan_on else None

    def sync(self, micro: int, module: nn.Module | None = None) -> contextlib.AbstractContextManager:
        """Gradient all-reduce on the last micro-batch of a step only (DDP no_sync before it)."""
        module = self.fwd if module is None else module
        last = micro == self.accum - 1
        return contextlib.nullcontext() if last or not self.run.info.enabled else module.no_sync()

    def backward(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backward of this micro-batch's generator loss (scaled for accumulation); returns the terms
        (the testing hook --debug_nan_steps poisons the loss of the steps it names)."""
        if self.pos.step in self.nan_steps:
            terms["loss"] = terms["loss"] * float("nan")
        self.scaler.scale(terms["loss"] / self.accum).backward()
        return terms

    def train_discriminator(
        self, micro: int, x: torch.Tensor, x_hat: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The discriminator's hinge loss on real x and detached x_hat, backward (once the GAN is on);
        returns its terms ({} before)."""
        if not self.gan_on:
            return {}
        with self.sync(micro, self.disc_fwd):
            d_terms = self.disc_fwd(x * 0.5 + 0.5, x_hat.detach().float() * 0.5 + 0.5)
            self.scaler_d.scale(d_terms["d_loss"] / self.accum).backward()
        return d_terms

    def accumulate(self, terms: dict[str, torch.Tensor], d_terms: dict[str, torch.Tensor]) -> None:
        """Add this micro-batch's terms to the step's means; one more micro-batch consumed."""
        for k, v in {**terms, **d_terms}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() / self.accum
        self.pos.batch += 1

    def finish_step(self) -> None:
        """Update both networks (skipped on any rank's non-finite loss or grad norm), the EMA, the step
        counter, the loss history and the log; then the periodic grids and checkpoints."""
        cfg, sums, pos = self.cfg, self.sums, self.pos
        # Every flag is read in one host sync: the generator is skipped on a non-finite loss (any
        # rank) or grad norm, the discriminator on those or its own grad norm.
        loss_flag = nonfinite_flag(*sums.values())
        gnorm, g_flag = unscale_and_clip(self.opt, self.scaler, self.g_params, cfg.optim.grad_clip)
        flags = [torch.maximum(loss_flag, g_flag)]
        if self.gan_on:
            dnorm, d_flag = unscale_and_clip(self.opt_d, self.scaler_d, self.d_params, cfg.optim.grad_clip)
            sums["grad_norm_d"] = dnorm
            flags.append(d_flag)
        bad, *d_own = read_flags(*flags)
        step_or_skip(self.opt, self.scaler, bad)
        if self.gan_on:
            bad = bad or d_own[0]
            step_or_skip(self.opt_d, self.scaler_d, bad)
        pos.count_update(bad, cfg.max_nonfinite, self.run)
        if not bad:
            self.ema.update(self.tok)
        pos.step += 1
        step, total = pos.step, self.sched.total
        self.history.add(sums["loss"])
        if step % max(cfg.log_every, 1) == 0 or step == total:
            self.history.read()
            means = {k: D.all_reduce_mean(v).item() for k, v in sums.items()}
            self.meter.log(step, means, self.lr, gnorm, pos.nonfinite_total)
        self.meter.update()
        periodic_hooks(cfg, step, total, self.reconstructions, self.save)
        if self.eval_every and (step % max(self.eval_every, 1) == 0 or step == total):
            self.online_evaluation(step)

    def online_evaluation(self, step: int) -> None:
        """--eval_every: the EMA tokenizer on the held-out subset, logged at `step` (rank 0 evaluates,
        the other ranks wait)."""
        if self.online is not None:
            self.ema.copy_to(self.ema_tok)
            metrics = self.online(self.ema_tok, self.run.amp_dtype)
            self.run.log(step, metrics)
            shown = ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items())
            self.run.print(f"online eval at step {step} ({self.online.num_images} held-out images): {shown}")
            if "online/rfid_subset" in metrics:
                self.run.print(f"  ({CAVEAT})")
        D.barrier()

    def finish(self) -> dict[str, Any]:
        """The end of the run: the last grid and held-out PSNR, the final checkpoint and export; returns
        the loss history, step counts, held-out PSNR at the start and end (and how many held-out images
        were used / unreadable), the unreadable training images skipped, wall time, and the bare model
        and its EMA."""
        self.meter.close()
        skipped = count_skipped_images(self.loader, self.run)
        eval_end = self.reconstructions(f"{self.pos.step:07d}")
        # The EMA tokenizer's latent statistics go with its final checkpoint and export, so that the
        # DiT^DH stage and sample.py take them from here (collective: every rank encodes its share).
        self.ema.copy_to(self.ema_tok)
        self.latent_stats = latent_statistics(self.ema_tok, self.cfg, self.run, self.root)
        stats = self.latent_stats
        self.run.print(
            f"latent statistics of the EMA tokenizer over {stats['images']} training images: channel-mean "
            f"mean {stats['mean'].mean():.4f}, std {stats['std'].mean():.4f}"
        )
        self.save(final=True)
        return {
            "history": self.history.read(),
            "start_step": self.meter.start_step,
            "step": self.pos.step,
            "eval_start": self.eval_start,
            "eval_end": eval_end,
            "heldout_images": len(self.eval_x),  # the images actually evaluated, unreadable ones left out
            "heldout_skipped": len(self.held_out.skipped),
            "skipped_images": skipped,
            "nonfinite_total": self.pos.nonfinite_total,
            "wall_s": self.meter.wall_s(),
            "model": self.tok,  # the bare module (for tests and notebooks)
            "ema": self.ema,
        }

    # ------------------------------------------------------------------ saving and showing

    def save(self, final: bool = False) -> None:
        """A checkpoint (every rank takes part, rank 0 writes); at the end also the EMA weights without
        the semantic decoder as safetensors (--export)."""
        cfg, run, tok = self.cfg, self.run, self.tok
        entries = run_entries(self.pos, self.sched, run, cfg, self.loader)  # collective
        if run.info.is_main:
            state = {
                "model": D.unwrap(tok).state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(),
                "disc": self.disc.state_dict() if self.disc is not None else None,
                "disc_optimizer": self.opt_d.state_dict() if self.opt_d is not None else None,
                "disc_scaler": self.scaler_d.state_dict(),
                **entries,
                "model_config": tok.cfg.to_dict(),
            }
            if final:
                state["latent_stats"] = self.latent_stats
            write_checkpoint(run, state, self.pos.step, cfg.keep_last)
            if final and cfg.export:
                self._export(run.run_dir / "tokenizer_ema.safetensors")
        D.barrier()

    def _export(self, path: Path) -> None:
        self.ema.copy_to(self.ema_tok)
        weights = {
            k: v for k, v in self.ema_tok.state_dict().items() if not k.startswith("semantic_decoder.")
        }
        store.export_safetensors(
            path,
            weights,
            {**self.tok.cfg.to_dict(), "semantic_dim": 0},
            step=self.pos.step,
            latent_mean=self.latent_stats["mean"].tolist(),
            latent_std=self.latent_stats["std"].tolist(),
            latent_stats_images=self.latent_stats["images"],
            latent_stats_fingerprint=self.latent_stats["tokenizer_fingerprint"],
            stage=self.cfg.stage,
            train_config=self.cfg.to_dict(),
        )

    def reconstructions(self, tag: str) -> dict[str, float]:
        """Reconstruction grid (originals / model / EMA) and mean held-out PSNR; rank 0 only."""
        if not self.run.info.is_main:
            return {}
        tok, eval_x = self.tok, self.eval_x
        self.ema.copy_to(self.ema_tok)
        tok.eval()
        x01 = eval_x * 0.5 + 0.5
        rec, rec_ema = tok.reconstruct(eval_x), self.ema_tok.reconstruct(eval_x)
        tok.train()
        n = min(8, len(eval_x))
        save_image_rows([x01[:n], rec[:n], rec_ema[:n]], self.run.run_dir / "images" / f"recon_{tag}.png")
        return {"psnr": float(psnr(rec, x01).mean()), "psnr_ema": float(psnr(rec_ema, x01).mean())}
