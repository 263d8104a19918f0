"""The items of bench/side_by_side.py: both sides built with the same weights, their outputs compared,
and the calls that get timed.

Every builder takes the parsed options and the imported release (side_by_side.import_release) and
returns a `Prepared`: the variants to time ("official", "ours", "ours+compile"), the max abs diffs
of the equality checks (ours vs the release: forward outputs, loss terms and gradients with the
release's random draws replayed on our side; compiled vs eager), and how to profile it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from rectok.checkpoints.official_dit import dit_to_official
from rectok.checkpoints.official_tokenizer import tokenizer_to_official
from rectok.models import flow
from rectok.models.dit import DiTDH, dit_config
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.sampling.generate import Sampler, SamplerConfig
from rectok.training.compiling import compile_model
from rectok.training.dit_stage import DiTDraws, flow_matching_loss
from rectok.training.losses import LossWeights
from rectok.training.optim import build_adamw, use_fused
from rectok.training.tokenizer_stage import stage1_losses

SEM_DIM = 384  # teacher feature width of the tokenizer items
DIT = dict(channels=32, grid=8, hidden=(192, 256), depth=(4, 1), heads=(3, 4), classes=10)
WEAK = dict(hidden=(96, 128), depth=(2, 1), heads=(3, 4))  # the AutoGuidance model of the sample item
SAMPLE_POINTS = 150
ADAMW_NOTE = (
    "AdamW: ours as train.py runs it (--optim.fused auto: torch's fused kernel, on a CPU too), the release "
    "torch's default (the per-parameter loop on a CPU); both agree to float rounding"
)
PROFILE_POINTS = 11  # the sample item's profile: 10 Euler steps


# ----------------------------------------------------------------------------- equality checks
def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def grads_in_official_layout(model: nn.Module, to_official: Callable) -> dict[str, torch.Tensor]:
    """Our gradients under the release's names: a copy of the model holding its .grad as weights, put
    through the same converter as the weights."""
    ghost = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ghost.parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return to_official(ghost)


def grad_maxdiff(ours: dict[str, torch.Tensor], release: dict[str, nn.Module]) -> float:
    """Largest |grad ours - grad release| over every trainable release parameter; `release` maps a
    name prefix in the official layout to the module holding those parameters."""
    worst = 0.0
    for prefix, module in release.items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                worst = max(worst, maxdiff(ours[prefix + name], p.grad))
    return worst


@dataclass
class Prepared:
    """One item, built and checked, ready to time."""

    description: str
    config: dict
    variants: dict[str, Callable[[], object]]
    checks: dict[str, float]  # max abs diffs; every one must stay <= --tolerance
    notes: list[str] = field(default_factory=list)
    compile_first_s: float | None = None  # seconds of the compiled variant's first calls (compiling)
    compile_first_calls: int = 0
    warmup: int | None = None
    profile_calls: int = 3
    profile_per_call: int = 1  # e.g. the Euler steps of one sampling call
    profile_unit: str = "step"
    profile_variants: dict[str, Callable[[], object]] | None = None  # None: the timed variants


def _first_call(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizers(release, img: int, mask_ratio: float):
    """Ours and the release's RecTok + semantic TransformerDecoder with the same weights."""
    torch.manual_seed(0)
    cfg = tokenizer_config(
        "rectok-tiny",
        img_size=img,
        semantic_dim=SEM_DIM,
        mask_ratio_min=mask_ratio,
        mask_ratio_max=mask_ratio,
    )
    ours = RecTok(cfg)
    off = release.rectok.RecTok(
        img_size=img, patch_size=16, vit_enc_model_size="tiny", vit_dec_model_size="tiny", token_channels=16,
        foundation_model_type="", gamma=1.0, noise_schedule="shift", mask_ratio=mask_ratio,
        mask_ratio_type="fixed",
    )  # fmt: skip
    sem = release.rectok.TransformerDecoder(
        img_size=img, patch_size=16, model_size="tiny", token_channels=16, sem_embed_dim=SEM_DIM
    )
    state = tokenizer_to_official(ours)
    prefix = f"sem_decoders.{cfg.teacher}."
    off.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)}, strict=True)
    sem.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return ours, off, sem, prefix


def release_flow_draws(seed: int, batch: int, seq_len: int, channels: int, ratio: float, shift: float):
    """The random draws of one training forward of the release's RecTok from the global RNG seeded
    with `seed`, in its order (mask noise, posterior noise, noise level, flow noise), as FlowDraws."""
    torch.manual_seed(seed)
    keep = math.ceil(seq_len * (1 - ratio))
    if ratio > 0:
        ids_shuffle = torch.argsort(torch.rand(batch, seq_len), dim=1)
    else:  # the release does not mask (nor draw) at ratio 0
        ids_shuffle = torch.arange(seq_len).expand(batch, -1)
    posterior_noise = torch.randn(batch, keep, channels)
    tau = flow.shift_tau(torch.rand(batch, 1, 1), shift).flatten()
    return flow.FlowDraws(ratio, ids_shuffle, posterior_noise, tau, torch.randn(batch, keep, channels))


def release_stage1(off, sem, x: torch.Tensor, target: torch.Tensor) -> tuple[dict, dict]:
    """The release's stage-1 forward (RecTok.forward with the teacher replaced by fixed features) and
    the generator loss of its utils/losses.py ReconstructionLoss without the perceptual and GAN terms.
    Returns (loss terms, encode()'s outputs with "images" and "semantic" added)."""
    ret = off.encode(x, sampling=True)
    images = off.decoder(ret["z_latents"], ids_restore=ret["ids_restore"])
    pred = sem(ret["sem_input"], ids_restore=ret["ids_restore"])
    mse = F.mse_loss((x * 0.5 + 0.5).float(), (images * 0.5 + 0.5).float())
    kl = ret["posteriors"].kl()
    kl = kl.sum() / kl.shape[0]
    semantic = (1 - (F.normalize(target, dim=-1) * F.normalize(pred, dim=-1)).sum(-1, keepdim=True)).mean()
    terms = {"loss": mse + 1e-6 * kl + semantic, "mse": mse, "kl": kl, "semantic": semantic}
    return terms, {**ret, "images": images, "semantic": pred}


class FixedTeacher(nn.Module):
    """Teacher features given in advance (both sides skip the teacher network alike)."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor, rope_rescale=None) -> torch.Tensor:
        return self.features


def tokenizer_train(args, release, img: int) -> Prepared:
    B, ratio = 16, args.mask_ratio
    ours, off, sem, prefix = build_tokenizers(release, img, ratio)
    cfg = ours.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, img, img, generator=g) * 2 - 1
    teacher = FixedTeacher(torch.randn(B, cfg.seq_len, SEM_DIM, generator=g))
    weights = LossWeights(mse=1.0, perceptual=0.0, kl=1e-6, semantic=1.0, gan=0.0)
    loss = lambda model, draws=None: stage1_losses(  # noqa: E731
        model, teacher, x, weights, perceptual=None, discriminator=None, draws=draws
    )[0]

    checks = {}
    ours.eval(), off.eval()
    with torch.no_grad():
        checks["eval_moments"] = maxdiff(ours.encoder(x), off.encoder(x)["z"])
        checks["eval_reconstruct"] = maxdiff(ours.reconstruct(x), off.reconstruct(x))
    ours.train(), off.train(), sem.train()
    draws = release_flow_draws(1234, B, cfg.seq_len, cfg.token_channels, ratio, cfg.shift)
    with torch.no_grad():
        out = ours(x, draws=draws)
    terms = loss(ours, draws)
    torch.manual_seed(1234)  # the release draws the same from the global RNG
    release_terms, ret = release_stage1(off, sem, x, teacher.features)
    if ratio > 0:
        checks["train_ids_restore"] = maxdiff(out.mask.ids_restore, ret["ids_restore"])
    checks["train_posterior_mean"] = maxdiff(out.posterior.mean, ret["posteriors"].mean)
    checks["train_images"] = maxdiff(out.images, ret["images"])
    checks["train_semantic"] = maxdiff(out.semantic, ret["semantic"])
    for k in ("mse", "kl", "semantic", "loss"):
        checks[f"loss_{k}"] = maxdiff(terms[k], release_terms[k])
    terms["loss"].backward()
    release_terms["loss"].backward()
    checks["grads"] = grad_maxdiff(
        grads_in_official_layout(ours, tokenizer_to_official), {"": off, prefix: sem}
    )
    ours.zero_grad(set_to_none=True), off.zero_grad(set_to_none=True), sem.zero_grad(set_to_none=True)

    def ours_step(model: nn.Module) -> Callable[[], None]:
        opt = build_adamw(model, 1e-4, 1e-4, fused=use_fused("auto", torch.device("cpu")))  # as train.py

        def step() -> None:
            loss(model)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    params = [*off.parameters(), *sem.parameters()]
    release_opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def release_step() -> None:
        release_opt.zero_grad(set_to_none=True)
        release_stage1(off, sem, x, teacher.features)[0]["loss"].backward()
        release_opt.step()

    prep = Prepared(
        f"tokenizer stage-1 train step, {img} px, batch {B}",
        dict(
            img=img, tokens=cfg.seq_len, kept=math.ceil(cfg.seq_len * (1 - ratio)), batch=B, mask_ratio=ratio
        ),
        {"official": release_step},
        checks,
        notes=[
            "loss: MSE + 1e-6 KL + cosine to fixed teacher features; release draws replayed on ours",
            ADAMW_NOTE,
        ],
    )
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = copy.deepcopy(ours)
        compile_model(compiled, args.compile_scope)
        out_c, seconds = _first_call(lambda: compiled(x, draws=draws))  # grad on: the training graphs
        out_e = ours(x, draws=draws)
        checks["compile_vs_eager_images"] = maxdiff(out_c.images, out_e.images)
        checks["compile_vs_eager_semantic"] = maxdiff(out_c.semantic, out_e.semantic)
        compiled_step = ours_step(compiled)
        _, first_step = _first_call(compiled_step)  # the backward graphs compile here
        prep.compile_first_s, prep.compile_first_calls = seconds + first_step, 1
    prep.variants["ours"] = ours_step(ours)
    if not args.no_compile:
        prep.variants["ours+compile"] = compiled_step
    return prep


def tokenizer_infer(args, release, img: int) -> Prepared:
    B = 32
    ours, off, _, _ = build_tokenizers(release, img, args.mask_ratio)
    ours.eval(), off.eval()
    x = torch.rand(B, 3, img, img, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        checks = {"reconstruct": maxdiff(ours.reconstruct(x), off.reconstruct(x))}
    prep = Prepared(
        f"tokenizer encode + decode (posterior mean), {img} px, batch {B}",
        dict(img=img, tokens=ours.cfg.seq_len, batch=B),
        {"official": lambda: off.reconstruct(x), "ours": lambda: ours.reconstruct(x)},
        checks,
    )
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = copy.deepcopy(ours)
        compile_model(compiled, args.compile_scope)
        out_c, prep.compile_first_s = _first_call(lambda: compiled.reconstruct(x))
        prep.compile_first_calls = 1
        checks["compile_vs_eager"] = maxdiff(out_c, ours.reconstruct(x))
        prep.variants["ours+compile"] = lambda: compiled.reconstruct(x)
    return prep


# ----------------------------------------------------------------------------- DiT^DH
def build_dits(release, hidden, depth, heads, seed: int):
    """Ours (weights perturbed: the release's init zeroes adaLN and the output layer, which would
    make every check trivially pass) and the release's DiTwDDTHead with the same weights."""
    torch.manual_seed(seed)
    cfg = dit_config(
        "dit-dh-tiny", in_channels=DIT["channels"], grid_size=DIT["grid"], hidden_size=hidden, depth=depth,
        num_heads=heads, num_classes=DIT["classes"],
    )  # fmt: skip
    ours = DiTDH(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    off = release_dit(release, hidden, depth, heads, SAMPLE_POINTS)
    off.load_state_dict(dit_to_official(ours), strict=True)
    return ours, off


def release_dit(release, hidden, depth, heads, points: int):
    """The release's DiTwDDTHead; its Euler grid (`points` time points) is fixed at construction."""
    return release.DDT.DiTwDDTHead(
        img_size=DIT["grid"] * 16, patch_size=[1, 1], tokenizer_patch_size=16, token_channels=DIT["channels"],
        hidden_size=list(hidden), depth=list(depth), num_heads=list(heads), num_classes=DIT["classes"],
        sampling_method="euler", num_sampling_steps=points,
    )  # fmt: skip


def dit_forward_diff(ours: DiTDH, off, batch: int = 16) -> float:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, DIT["channels"], DIT["grid"], DIT["grid"], generator=g)
    t, y = torch.rand(batch, generator=g), torch.randint(0, DIT["classes"], (batch,), generator=g)
    ours.eval(), off.eval()
    with torch.no_grad():
        return maxdiff(ours(x, t, y), off.net(x, t, y))


def release_dit_draws(seed: int, x1: torch.Tensor, shift: float, dropout: float) -> DiTDraws:
    """The draws of the release's DiTwDDTHead.forward (transport.training_losses) from the global RNG
    seeded with `seed` (noise, time, label dropout), as our DiTDraws. The release shifts its time,
    t = 1 - s u / (1 + (s - 1) u), only when s > 1; at s <= 1 it trains on t = u, which our loss
    reproduces with u' = shift_tau(1 - u, 1 / s) (shift_tau(., 1 / s) inverts shift_tau(., s))."""
    torch.manual_seed(seed)
    noise = torch.randn_like(x1)
    u = torch.rand(x1.shape[0])
    drop = torch.rand(x1.shape[0]) < dropout
    return DiTDraws(noise, u if shift > 1 else flow.shift_tau(1 - u, 1 / shift), drop)


def dit_train(args, release) -> Prepared:
    B = 16
    ours, off = build_dits(release, DIT["hidden"], DIT["depth"], DIT["heads"], seed=0)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(B, DIT["channels"], DIT["grid"], DIT["grid"], generator=g)  # cached latents
    y = torch.randint(0, DIT["classes"], (B,), generator=g)
    shift = flow.timestep_shift(DIT["grid"], DIT["grid"], DIT["channels"])

    checks = {"forward": dit_forward_diff(ours, off)}
    ours.train(), off.train()
    draws = release_dit_draws(7, x1, shift, off.y_embedder.dropout_prob)
    loss = flow_matching_loss(ours, x1, y, shift, draws=draws)
    torch.manual_seed(7)
    release_loss = off(x1, y)
    checks["train_loss"] = maxdiff(loss, release_loss)
    loss.backward()
    release_loss.backward()
    checks["grads"] = grad_maxdiff(grads_in_official_layout(ours, dit_to_official), {"": off})
    ours.zero_grad(set_to_none=True), off.zero_grad(set_to_none=True)
    notes = [f"time shift s = {shift:.3f}", ADAMW_NOTE]
    if shift <= 1:
        notes.append(
            "s <= 1: the release trains on t = u unshifted, ours on t = 1 - shift_tau(u, s); the loss "
            "check maps the release's u onto ours (see release_dit_draws)"
        )

    def ours_step(model: nn.Module) -> Callable[[], None]:
        opt = build_adamw(model, 2e-4, 0.0, fused=use_fused("auto", torch.device("cpu")))  # as train.py

        def step() -> None:  # rectok/training/dit_stage.py per micro-batch, minus data and DDP
            flow_matching_loss(model, x1, y, shift).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    release_opt = torch.optim.AdamW(off.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def release_step() -> None:  # the release's train_one_epoch_generator, minus data and logging
        release_opt.zero_grad(set_to_none=True)
        off(x1, y).backward()
        release_opt.step()

    prep = Prepared(
        f"DiT^DH train step, {DIT['grid']}x{DIT['grid']}x{DIT['channels']} latents, batch {B}",
        dict(DIT, batch=B, time_shift=round(shift, 4)),
        {"official": release_step},
        checks,
        notes,
    )
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = copy.deepcopy(ours)
        compile_model(compiled, args.compile_scope)
        t = torch.rand(B, generator=g)
        keep = torch.zeros(B, dtype=torch.bool)
        out_c, seconds = _first_call(lambda: compiled(x1, t, y, label_drop=keep))
        checks["compile_vs_eager"] = maxdiff(out_c, ours(x1, t, y, label_drop=keep))
        compiled_step = ours_step(compiled)
        _, first_step = _first_call(compiled_step)
        prep.compile_first_s, prep.compile_first_calls = seconds + first_step, 1
    prep.variants["ours"] = ours_step(ours)
    if not args.no_compile:
        prep.variants["ours+compile"] = compiled_step
    return prep


def sampling(args, release) -> Prepared:
    B, w = 16, args.guidance_scale
    dit, off = build_dits(release, DIT["hidden"], DIT["depth"], DIT["heads"], seed=0)
    weak, off_weak = build_dits(release, WEAK["hidden"], WEAK["depth"], WEAK["heads"], seed=1)
    checks = {"forward_main": dit_forward_diff(dit, off), "forward_weak": dit_forward_diff(weak, off_weak)}
    torch.manual_seed(0)  # the pixel decoder is not run: latents only
    tok = RecTok(
        tokenizer_config(
            "rectok-tiny", img_size=DIT["grid"] * 16, token_channels=DIT["channels"], semantic_dim=0
        )
    )
    stats = (torch.zeros(DIT["channels"]), torch.ones(DIT["channels"]))
    cfg = SamplerConfig(num_points=SAMPLE_POINTS, guidance="autoguidance", scale=w, cuda_graph="off")
    sampler = Sampler(dit, tok, stats, cfg, weak=weak, device="cpu")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, DIT["channels"], DIT["grid"], DIT["grid"], generator=g)
    labels = torch.arange(B) % DIT["classes"]
    guide = SimpleNamespace(use_auto_guidance=True, additional_model_forward=off_weak.net)
    with torch.inference_mode():
        reference = off.sample_fn(
            noise, off.forward_with_autoguidance, y=labels, cfg_scale=w,
            additional_model_forward=off_weak.net, cfg_interval=(0, 1),
        )[-1]  # fmt: skip
    latents = sampler.latents(noise, labels)
    checks["latents"] = maxdiff(latents, reference)
    prep = Prepared(
        f"{SAMPLE_POINTS}-point Euler + AutoGuidance, latents, batch {B}",
        dict(batch=B, points=SAMPLE_POINTS, scale=w, main=DIT, weak=WEAK),
        {
            "official": lambda: off.generate(B, labels, cfg=w, args=guide),  # draws its noise (one randn)
            "ours": lambda: sampler.latents(noise, labels),
        },
        checks,
        notes=[f"largest |latent| {reference.abs().max().item():.2f}"],
        warmup=1,
        profile_calls=2,
        profile_per_call=PROFILE_POINTS - 1,
        profile_unit=f"Euler step (runs of {PROFILE_POINTS - 1} steps profiled)",
    )
    # The profile runs a short grid: per-step counts are the same, and a 149-step run recorded with
    # Python stacks would hold ~10^6 events.
    off_short = release_dit(release, DIT["hidden"], DIT["depth"], DIT["heads"], PROFILE_POINTS)
    off_short.load_state_dict(off.state_dict())
    short_cfg = dataclasses.replace(cfg, num_points=PROFILE_POINTS)
    short = Sampler(dit, tok, stats, short_cfg, weak=weak, device="cpu")
    prep.profile_variants = {
        "official": lambda: off_short.eval().generate(B, labels, cfg=w, args=guide),
        "ours": lambda: short.latents(noise, labels),
    }
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = Sampler(
            copy.deepcopy(dit), tok, stats, dataclasses.replace(cfg, compile=True),
            weak=copy.deepcopy(weak), device="cpu",
        )  # fmt: skip
        out_c, prep.compile_first_s = _first_call(lambda: compiled.latents(noise, labels))
        prep.compile_first_calls = 1
        checks["compile_vs_eager"] = maxdiff(out_c, latents)
        prep.variants["ours+compile"] = lambda: compiled.latents(noise, labels)
        # the same modules compiled again: Dynamo's cache has their graphs already
        short_c = Sampler(
            compiled.dit,
            tok,
            stats,
            dataclasses.replace(short_cfg, compile=True),
            weak=compiled.weak,
            device="cpu",
        )
        prep.profile_variants["ours+compile"] = lambda: short_c.latents(noise, labels)
    return prep


BUILDERS: dict[str, Callable[[argparse.Namespace, SimpleNamespace], Prepared]] = {  # by item name
    "tok64": lambda a, r: tokenizer_train(a, r, 64),
    "tok128": lambda a, r: tokenizer_train(a, r, 128),
    "dit": dit_train,
    "sample": sampling,
    "infer64": lambda a, r: tokenizer_infer(a, r, 64),
    "infer128": lambda a, r: tokenizer_infer(a, r, 128),
}
