"""DiT^DH training on the frozen tokenizer's latents (SPEC section 6): t = 1 is data,
x_t = t x + (1 - t) eps, target x - eps, u ~ U(0, 1), t = 1 - s u / (1 + (s - 1) u) with the
tokenizer's time shift s. DDP, or FSDP2 (`--dit.parallel fsdp`) with full-state checkpoints."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rectok import kernels
from rectok.checkpoints import loading, sharded, store
from rectok.models import flow
from rectok.models.dit import DiTDH, LatentNormalizer, dit_config
from rectok.models.layers import set_activation_checkpointing
from rectok.models.tokenizer import DiagonalGaussian
from rectok.sampling.euler import euler_sample
from rectok.sampling.images import save_image_rows
from rectok.training import distributed as D
from rectok.training.batches import data_root, step_batches, train_loader
from rectok.training.compiling import compile_model
from rectok.training.config import TrainConfig
from rectok.training.ema import EMA
from rectok.training.latents import (
    CachedMoments,
    build_latent_cache,
    latent_cache_tag,
    latent_statistics,
    tokenizer_fingerprint,
)
from rectok.training.loop import (
    LossHistory,
    count_skipped_images,
    periodic_hooks,
    resume_position,
    run_entries,
    write_checkpoint,
)
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

TOKENIZER_HINT = "Train a tokenizer first: `python train.py` writes runs/demo."


@dataclass(frozen=True)
class DiTDraws:
    """The random draws of one DiT^DH loss evaluation, for replaying a step (e.g. the release's)."""

    noise: torch.Tensor  # eps [B, C, h, w]
    u: torch.Tensor  # [B] in [0, 1): the time before the shift, t = 1 - s u / (1 + (s - 1) u)
    label_drop: torch.Tensor | None = None  # [B] bool, True: null class; None: the model draws it


def model_label_dropout(model: Callable[..., torch.Tensor], y: torch.Tensor) -> torch.Tensor | None:
    """The label-dropout mask the (possibly wrapped) DiT^DH would draw in its forward, or None where
    it draws nothing (eval mode, dropout 0, or not a DiTDH)."""
    bare = D.unwrap(model) if isinstance(model, torch.nn.Module) else model
    return bare.label_dropout_mask(y) if isinstance(bare, DiTDH) else None


def flow_matching_loss(
    model: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    y: torch.Tensor,
    shift: float,
    draws: DiTDraws | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Velocity MSE (float32 scalar) of `model` (a DiTDH, possibly DDP-wrapped) on data x1 [B, C, h, w]
    (t = 1) with labels y [B]: x_t = t x1 + (1 - t) eps, target x1 - eps. The noise, the time and
    (inside the model, in training mode) the label-dropout mask are drawn unless `draws` gives them;
    the forward runs under `autocast()`."""
    if draws is None:
        # The release's order: noise, time, then the label dropout (in its model's forward; drawn
        # here, the same numbers, so that a compiled DiT^DH is one graph without a draw inside).
        eps = torch.randn(x1.shape, device=x1.device)
        u = torch.rand(x1.shape[0], device=x1.device)
        label_drop = model_label_dropout(model, y)
    else:
        eps, u, label_drop = draws.noise, draws.u, draws.label_drop
    t = 1.0 - flow.shift_tau(u, shift)
    x_t = kernels.flow_interpolate(eps, x1, t)  # t * x1 + (1 - t) * eps
    with autocast():
        v = model(x_t, t, y, label_drop=label_drop)
    return kernels.velocity_mse(v.float(), x1, eps)


def _sharded_state(dit: DiTDH, opt: torch.optim.Optimizer, ema: EMA) -> dict:
    """This rank's shards of the model, the optimizer and the EMA averages (DTensors, no gather):
    what a sharded checkpoint holds, and the template it loads into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "model": get_model_state_dict(dit),
        "optimizer": get_optimizer_state_dict(dit, opt),  # initialises an empty AdamW state first
        "ema": {"params": ema.params, "buffers": ema.buffers},  # loaded in place
    }


def _set_sharded_state(dit: DiTDH, opt: torch.optim.Optimizer, shards: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(dit, shards["model"])
    set_optimizer_state_dict(dit, opt, shards["optimizer"])


def _load_full_into_shards(dit: DiTDH, opt: torch.optim.Optimizer, state: dict) -> None:
    """A full (unsharded) checkpoint into an FSDP run: every rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(dit, state["model"], options=full)
    set_optimizer_state_dict(dit, opt, state["optimizer"], options=full)


def _full_ema_state(ema: EMA) -> dict:
    """The EMA state with its (possibly sharded) averages gathered to full CPU tensors."""
    e = ema.state_dict()
    return {
        **e,
        "params": {k: D.full_tensor(v).cpu() for k, v in e["params"].items()},
        "buffers": {k: D.full_tensor(v).cpu() for k, v in e["buffers"].items()},
    }


def check_same_tokenizer(state: dict, fingerprint: str, resume: Path, tokenizer_ckpt: str) -> None:
    """A DiT^DH resumed on another tokenizer's latents would train on a different space without a
    word: refuse it (checkpoints from before the fingerprint was recorded are let through)."""
    saved = state.get("tokenizer_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ValueError(
            f"--resume {resume}: that DiT^DH was trained on the latents of tokenizer "
            f"{state.get('tokenizer')} "
            f"(weights fingerprint {saved}), but --dit.tokenizer_ckpt {tokenizer_ckpt} has fingerprint "
            f"{fingerprint}: pass the same tokenizer, or start a new run folder"
        )


def dit_latent_statistics(
    cfg: TrainConfig, run: Run, root: Path, loaded_tok: loading.Loaded, fingerprint: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mean, std, where they came from) per --dit.latent_stats: "tokenizer" takes the statistics the
    tokenizer stage stored with its weights (refused when they belong to other weights), and
    computes them when there are none or the tokenizer was loaded at another size; "recompute"
    always computes them; anything else is a statistics file."""
    choice, path = cfg.dit.latent_stats, loaded_tok.path
    if choice not in ("tokenizer", "recompute"):
        mean, std = loading.read_latent_stats(choice)
        return mean, std, choice
    if choice == "tokenizer" and loaded_tok.latent_stats is not None and loaded_tok.resampled_from is None:
        saved = loaded_tok.stats_fingerprint
        if saved is not None and saved != fingerprint:
            raise ValueError(
                f"the latent statistics in {path} belong to other tokenizer weights (fingerprint {saved}, "
                f"these weights {fingerprint}): pass --dit.latent_stats recompute"
            )
        mean, std = loaded_tok.latent_stats
        return mean, std, str(path)
    stats = latent_statistics(loaded_tok.model, cfg, run, root)
    return stats["mean"], stats["std"], f"{stats['images']} training images (computed now)"


def train_dit(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """DiT^DH on the frozen tokenizer's (EMA) latents; returns the loss history, step counts, wall
    time, and the bare model (sharded under FSDP) and its EMA."""
    device, info = run.device, run.info
    seed_everything(cfg.seed)

    # ---- frozen tokenizer (EMA weights), data, latent statistics
    loaded_tok = loading.load_tokenizer(
        cfg.dit.tokenizer_ckpt,
        use_ema=True,
        hint=TOKENIZER_HINT,
        verify=cfg.ckpt_verify,
        img_size=cfg.tok.img_size or None,  # another size resamples its position embeddings
    )
    tok = loaded_tok.model.to(device)
    tok.eval().requires_grad_(False)
    tok_print = D.broadcast_object(tokenizer_fingerprint(tok) if info.is_main else None)
    tcfg = tok.cfg
    C, grid = tcfg.token_channels, tcfg.grid_size
    shift = cfg.dit.time_shift or flow.timestep_shift(grid, grid, C)
    root = data_root(cfg, run)
    image_loader = train_loader(cfg, run, root, tcfg.img_size)
    classes = image_loader.samples.classes
    num_classes = cfg.dit.num_classes or (len(classes) if classes else 0)
    if num_classes < 1:
        raise ValueError("the dataset has no class folders: pass --dit.num_classes")

    resume, state = store.resolve_resume(cfg.resume, run.run_dir, cfg.ckpt_verify)
    if state is not None:
        check_same_tokenizer(state, tok_print, resume, cfg.dit.tokenizer_ckpt)
        mu, std = state["latent_stats"]["mean"], state["latent_stats"]["std"]
        stats_from = f"the checkpoint {resume}"
    else:
        mu, std, stats_from = dit_latent_statistics(cfg, run, root, loaded_tok, tok_print)
        if info.is_main:
            store.export_safetensors(
                run.run_dir / "latent_stats.safetensors",
                {"mean": mu, "std": std},
                {"token_channels": C, "grid": grid},
                tokenizer=str(cfg.dit.tokenizer_ckpt),
                tokenizer_fingerprint=tok_print,
                source=stats_from,
            )
    normalizer = LatentNormalizer(mu, std).to(device)
    run.print(
        f"latent statistics from {stats_from}: channel-mean mean {mu.mean():.4f}, std {std.mean():.4f}; "
        f"shift s = {shift:.3f}"
    )

    loader = image_loader
    if cfg.dit.cache_latents:
        tag = latent_cache_tag(tok, root, tok_print)
        cache = build_latent_cache(tok, cfg, run, root, tag)
        loader = CachedMoments(
            cache, image_loader.samples, cfg.micro_batch, info.rank, info.world_size, cfg.seed, cfg.data.hflip
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
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt = build_adamw(dit, cfg.base_lr(), cfg.optim.weight_decay, betas, use_fused(cfg.optim.fused, device))
    if cfg.activation_checkpointing:
        set_activation_checkpointing(dit)
    if cfg.compile:
        compile_model(dit, cfg.compile_scope, fsdp=fsdp, mode=cfg.compile_mode)
    fwd = dit if fsdp else D.wrap_ddp(dit, info)
    accum = cfg.grad_accum(info.world_size)
    sched = Schedule(cfg, len(loader), accum)

    # ---- resume
    seed_everything(cfg.seed * 1000 + info.rank)
    pos = Position()
    if state is not None:
        if "sharded" in state:  # an FSDP run's shards (DCP), resharded onto this world size
            shards = _sharded_state(dit, opt, ema)
            sharded.load_sharded(resume.parent, state["sharded"], shards)
            _set_sharded_state(dit, opt, shards)
            ema.decay, ema.num_updates = state["ema_meta"]["decay"], state["ema_meta"]["num_updates"]
        elif fsdp:
            _load_full_into_shards(dit, opt, state)
            ema.load_state_dict(state["ema"])
        else:
            dit.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            ema.load_state_dict(state["ema"])
        scaler.load_state_dict(state["scaler"])
        pos = resume_position(state, resume, sched, run, cfg, loader)

    pending: list[sharded.PendingSave] = []  # an async sharded save still being written

    def save(final: bool = False) -> None:
        # Collective: every rank gathers its RNG states (and, under FSDP, writes its shards).
        entries = run_entries(pos, sched, run, cfg, loader)
        state = {
            "scaler": scaler.state_dict(),
            **entries,
            "model_config": asdict(dcfg),
            "latent_stats": {"mean": mu.cpu(), "std": std.cpu()},
            "tokenizer": str(cfg.dit.tokenizer_ckpt),
            "tokenizer_fingerprint": tok_print,
            "tokenizer_img_size": tcfg.img_size,
            "time_shift": shift,
        }
        step = pos.step
        if fsdp:  # no gather: every rank writes its shards, then rank 0 the small .pt pointing at them
            while pending:
                pending.pop().finish()

            def write_pointer(listing: dict) -> None:
                meta = {"decay": ema.decay, "num_updates": ema.num_updates}
                write_checkpoint(run, {**state, "ema_meta": meta, "sharded": listing}, step, cfg.keep_last)
                sharded.prune(run.run_dir)

            job = sharded.save_sharded(
                run.run_dir,
                step,
                _sharded_state(dit, opt, ema),
                write_pointer,
                cfg.dit.async_save and not final,
            )
            if cfg.dit.async_save and not final:
                pending.append(job)
            else:
                job.finish()
        elif info.is_main:
            full = {"model": D.full_state_dict(dit), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
            write_checkpoint(run, {**full, **state}, step, cfg.keep_last)
        if final and cfg.export:
            ema_sd = _full_ema_state(ema)  # collective under FSDP: the one gather, for the export
            if info.is_main:
                weights = {**ema_sd["params"], **ema_sd["buffers"]}
                store.export_safetensors(
                    run.run_dir / "dit_ema.safetensors",
                    {k: weights[k] for k in dit.state_dict()},
                    asdict(dcfg),
                    step=pos.step,
                    latent_mean=mu.tolist(),
                    latent_std=std.tolist(),
                    time_shift=shift,
                    tokenizer=str(cfg.dit.tokenizer_ckpt),
                    tokenizer_fingerprint=tok_print,
                    tokenizer_img_size=tcfg.img_size,
                    train_config=cfg.to_dict(),
                )
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
        save_image_rows([imgs], run.run_dir / "images" / f"samples_{tag}.png")

    # ---- loop
    nan_steps = cfg.nan_steps()
    history = LossHistory()
    meter = StepMeter(run, sched, pos.step, desc="dit")  # the first sample grid counts in the wall time
    images(f"{pos.step:07d}")
    dit.train()
    for batches in step_batches(loader, sched, pos):
        lr = sched.lr(pos.step)
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
            sync = micro == accum - 1 or fsdp or not info.enabled
            with contextlib.nullcontext() if sync else fwd.no_sync():
                loss = flow_matching_loss(fwd, x1, y, shift, autocast=run.autocast)
                if pos.step in nan_steps:  # testing hook: a poisoned step
                    loss = loss * float("nan")
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
            pos.batch += 1

        # -------- update (skipped on any rank's non-finite loss or grad norm)
        loss_flag = nonfinite_flag(loss_sum)
        gnorm, norm_flag = unscale_and_clip(opt, scaler, list(dit.parameters()), cfg.optim.grad_clip)
        (bad,) = read_flags(torch.maximum(loss_flag, norm_flag))  # the step's one host sync
        step_or_skip(opt, scaler, bad)
        pos.count_update(bad, cfg.max_nonfinite, run)
        if not bad:
            ema.update(dit)
        pos.step += 1
        step = pos.step
        history.add(loss_sum)

        # -------- hooks (the losses reach the host at log steps only)
        if step % max(cfg.log_every, 1) == 0 or step == sched.total:
            meter.log(step, {"loss": history.read()[-1]}, lr, gnorm, pos.nonfinite_total)
        meter.update()
        periodic_hooks(cfg, step, sched.total, images, save)
    meter.close()
    skipped = count_skipped_images(loader, run)  # collective, before the rank-0-only work below
    images(f"{pos.step:07d}")
    save(final=True)
    return {
        "history": history.read(),
        "start_step": meter.start_step,
        "step": pos.step,
        "nonfinite_total": pos.nonfinite_total,
        "skipped_images": skipped,
        "wall_s": meter.wall_s(),
        "model": dit,  # the bare module (sharded under FSDP)
        "ema": ema,
    }
