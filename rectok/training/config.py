"""Training configuration: dataclasses, named presets, and command-line overrides.

Config flows one way: dataclass defaults -> preset (per stage) -> optional JSON file ->
`--section.field value` overrides. The resolved config is printed at start and stored
in every checkpoint, so a run can be rebuilt from its checkpoint alone.

Batch sizes: `global_batch` is the number of images per optimizer step over all GPUs
and nodes (the paper's "batch 1024"); `micro_batch` is what one GPU runs per forward.
Gradient accumulation fills the gap: accum = global_batch / (micro_batch * world_size),
which must be a whole number. The learning rate, when not given, is scaled from the
global batch: lr = blr * global_batch / 256. Epochs are passes over the training set;
one optimizer step consumes global_batch images.

Presets, selected by (stage, name):
- tokenizer / rectok-B : stage 1 of the release (SPEC section 5), ImageNet 256 px, 200 epochs.
- decoder   / rectok-B : stage 2, pixel-decoder fine-tuning from a stage-1 checkpoint.
- dit       / dit-dh-xl: DiT^DH-XL on the tokenizer's latents (SPEC section 6), 80 epochs.
- dit       / dit-dh-s : DiT^DH-S, the AutoGuidance "weak" model (30 epochs).
- <stage>   / tiny     : CPU-sized versions on the generated demo dataset (the default).

Ablations (`--ablation NAME`, tokenizer stage, on top of any preset): the rows of the paper's
tokenizer ablations, listed in ABLATIONS (no-fsd, align-only, recon-only, c16 ... c128, dinov2,
dinov3, schedule-shift / -uniform / -lognorm).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from rectok.checkpoints.store import VERIFY_MODES
from rectok.data.transforms import CROPS
from rectok.kernels.backend import BACKENDS as KERNEL_BACKENDS
from rectok.models.flow import SCHEDULES as NOISE_SCHEDULES
from rectok.models.teacher import TARGET_MODES, TEACHER_CHOICES
from rectok.training.compiling import COMPILE_MODES, COMPILE_SCOPES
from rectok.training.distributed import DEVICES
from rectok.training.losses import PERCEPTUAL_PRECISIONS, SEMANTIC_TOKENS
from rectok.training.losses import WEIGHT_MODES as PERCEPTUAL_WEIGHTS
from rectok.training.optim import FUSED_CHOICES
from rectok.training.optim import SCHEDULES as LR_SCHEDULES

# The choices of the options that name a behaviour are those of the module that implements it.
STAGES = ("tokenizer", "decoder", "dit")
PRECISIONS = ("bf16", "fp16", "fp32")  # fp16 uses a GradScaler; bf16 and fp32 need none
DISTRIBUTED = ("ddp", "fsdp")
PROGRESS_MODES = ("auto", "bar", "lines")
# Each rank seeds numpy with seed * 1000 + rank (< 1000 ranks), and numpy takes seeds below 2**32.
MAX_SEED = (2**32 - 1000) // 1000

# --help text of the options whose one-line field comment cannot say enough.
LONG_HELP = {
    "resume": '"" (the default): start fresh, refused when run_dir holds a previous run (checkpoints, '
    "manifest.json or metrics). auto: the newest checkpoint in run_dir that passes --ckpt_verify and "
    "loads; damaged newer ones are skipped with a warning saying why; with none usable, start fresh "
    "only in an unused run_dir. never: start fresh even over a previous run, whose files move to "
    "run_dir/previous-<time>/. PATH: that checkpoint file (a damaged one is an error) or that run "
    "folder's newest usable checkpoint.",
    "ckpt_verify": "how a checkpoint is checked against manifest.json before resuming: full = size and "
    "sha256 (reads the file once more; logs the time it took), size = byte count only (for very large "
    "files). A checkpoint the manifest does not list is loaded with a warning.",
}


@dataclass
class DataConfig:
    path: str = "demo"  # ImageFolder-style root, or "demo" for the generated demo dataset
    hflip: bool = True  # random horizontal flip (training only)
    crop: str = "center"  # training crop: center (ADM, as the release) or random_resized
    num_workers: int = 4
    eval_images: int = 16  # held-out images for the reconstruction grid / PSNR
    stats_images: int = 0  # images for the latent statistics, evenly spread over the train split; 0 = all
    online_eval_images: int = 5000  # the fixed held-out subset of --eval_every (evenly spread over val)
    inception_weights: str = ""  # FID Inception-v3 weights for the online rFID ("" = the hub cache)


@dataclass
class OptimConfig:
    lr: float = 0.0  # absolute learning rate; 0 = blr * global_batch / 256
    blr: float = 1e-4  # base learning rate per 256 images
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | constant | const_linear (see rectok.optim.LRSchedule)
    warmup_epochs: float = 50.0
    hold_epochs: float = 0.0  # const_linear: constant until here
    decay_end_epochs: float = 0.0  # const_linear / cosine: reach min_lr here; 0 = at the last epoch
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1e-4
    grad_clip: float = 3.0  # max total grad norm; 0 disables clipping (the norm is logged either way)
    ema_decay: float = 0.999
    fused: str = "auto"  # AdamW kernel: auto (fused on CUDA and CPU) | on | off (optim.use_fused)


@dataclass
class LossConfig:
    mse: float = 1.0
    perceptual: float = 1.0
    kl: float = 1e-6
    semantic: float = 1.0
    gan: float = 0.5
    gan_start_epoch: float = 100.0  # generator term and discriminator updates from this epoch on
    perceptual_weights: str = "pretrained"  # pretrained (local files) | random (tests / demos only)
    weights_dir: str = ""  # folder with vgg16-397923af.pth and convnext_small-0c510722.pth
    perceptual_resize: int = 224  # ConvNeXt input size
    # Speed options of the frozen LPIPS / ConvNeXt forwards (the release: fp32, NCHW); see
    # losses.PerceptualLoss and bench/perceptual.py
    perceptual_precision: str = "fp32"  # fp32 | bf16 (autocast; the loss itself stays float32)
    perceptual_channels_last: bool = False
    # Tokens the semantic loss covers: all (the paper) | visible (alignment only) | masked
    # (reconstruction only).
    semantic_tokens: str = "all"
    disc_ndf: int = 64
    disc_layers: int = 3


@dataclass
class TokenizerTrainConfig:
    preset: str = "rectok-B"  # rectok.tokenizer.PRESETS
    token_channels: int = 0  # 0 = the preset's C
    # 0 = the preset's (stage 1) / the checkpoint's (decoder, dit stages); another size resamples the
    # tokenizer's position embeddings to the new patch grid
    img_size: int = 0
    teacher: str = "dinov3"  # dinov3 | dinov2 (ViT-L) | tiny (small DINOv3-style ViT for tests and demos)
    teacher_weights: str = ""  # local weight file; "" = HF / torch hub cache (offline); "random" = untrained
    # release: what the official release computes (uint8 floor before the HF processor, teacher in
    # train mode with DINOv3's RoPE rescale); clean: deterministic eval-mode targets, no floor.
    teacher_targets: str = "release"
    mask_ratio_min: float = -0.1  # r = max(0, U(min, max)) per step
    mask_ratio_max: float = 0.4
    noise_schedule: str = "shift"
    timestep_shift: float = 0.0  # 0 = sqrt(grid_h * grid_w * C / 4096)
    gamma: float = 1.0  # forward-flow noise scale (0: no flow)
    semantic_flow: bool = True  # the semantic decoder reads z_t (FSD); false: the clean z (w/o FSD)
    init_from: str = ""  # decoder stage: the stage-1 checkpoint (.pt of this project)


@dataclass
class DiTTrainConfig:
    preset: str = "dit-dh-xl"  # rectok.dit.DIT_DH_PRESETS
    tokenizer_ckpt: str = ""  # checkpoint (.pt) or exported .safetensors of the tokenizer
    num_classes: int = 0  # 0 = the dataset's number of classes
    label_dropout: float = 0.1
    time_shift: float = 0.0  # 0 = the tokenizer's sqrt(h * w * C / 4096)
    cache_latents: bool = False  # encode the dataset once, store posterior moments (+ flipped copies)
    cache_dir: str = ""  # default: <run_dir>/latent_cache
    # tokenizer: the statistics the tokenizer stage stored with --dit.tokenizer_ckpt (computed here
    # when it has none, or when loaded at another size); recompute; or a statistics file
    latent_stats: str = "tokenizer"
    sample_steps: int = 50  # Euler grid points of the periodic sample grids
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard of every block; sharded DCP checkpoints)
    async_save: bool = False  # fsdp: write checkpoints in the background (DCP async_save)


@dataclass
class TrainConfig:
    stage: str = "tokenizer"
    preset: str = "tiny"
    run_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # autocast dtype on CUDA; CPU always runs float32
    compile: bool = False
    compile_scope: str = "auto"  # auto | modules | blocks (rectok/training/compiling.py)
    # torch.compile mode: default | reduce-overhead (CUDA graphs of the compiled graphs, on CUDA; for
    # the DiT^DH, whose shapes are static) | max-autotune
    compile_mode: str = "default"
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less memory)
    kernels: str = "auto"  # auto | triton | torch (rectok.kernels backend)
    epochs: float = 200.0
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    global_batch: int = 1024  # images per optimizer step over all ranks
    micro_batch: int = 64  # images per GPU per forward
    log_every: int = 50
    # Online evaluation every N epochs (0 = off): the EMA tokenizer's PSNR / SSIM / rFID on the
    # held-out subset data.online_eval_images (a monitor, not the paper's protocol)
    eval_every: float = 0.0
    image_every: int = 1000  # reconstruction / sample grid PNG every N steps (0 = start and end only)
    ckpt_every: int = 5000  # checkpoint every N steps (and at the end)
    keep_last: int = 3
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row
    tensorboard: bool = True
    wandb: str = ""  # "project/name" (or "project"): also log to Weights & Biases (pip install wandb)
    progress: str = "auto"  # auto: a bar on a terminal, else log lines | bar | lines (every log_every)
    resume: str = ""  # "" | auto | never | PATH (see LONG_HELP)
    ckpt_verify: str = "full"  # full | size: check a resumed checkpoint against manifest.json
    export: bool = True  # write the EMA weights as safetensors at the end
    ablation: str = ""  # a row of the paper's tokenizer ablations (ABLATIONS): no-fsd, c16, dinov2, ...
    debug_nan_steps: str = ""  # testing only: comma-separated steps whose loss is made NaN
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tok: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    dit: DiTTrainConfig = field(default_factory=DiTTrainConfig)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def grad_accum(self, world_size: int) -> int:
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch} x "
                f"world size {world_size} = {per_step}; choose --global_batch / --micro_batch "
                "so that it divides"
            )
        return self.global_batch // per_step

    def base_lr(self) -> float:
        return self.optim.lr if self.optim.lr > 0 else self.optim.blr * self.global_batch / 256

    def _get(self, key: str) -> Any:
        """The value of a dotted key ("optim.lr")."""
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def nan_steps(self) -> set[int]:
        return {int(s) for s in self.debug_nan_steps.split(",") if s.strip()}

    def validate(self) -> TrainConfig:
        """Raise ValueError with an actionable message for any bad value; returns self."""
        from rectok.models.dit import DIT_DH_PRESETS
        from rectok.models.tokenizer import PRESETS as TOKENIZER_PRESETS

        err = _Errors()
        # First: every float must be finite. inf passes every ">= 0" below and NaN fails them with a
        # misleading message; either one later poisons the weights (lr) or the step arithmetic (epochs).
        for key, tp in leaf_fields().items():
            value = self._get(key)
            if tp is float and not math.isfinite(value):
                err.nonfinite(key, value)
        err.choice("stage", self.stage, STAGES)
        if self.stage in STAGES:
            err.choice(f"preset (for stage {self.stage})", self.preset, tuple(preset_names(self.stage)))
        err.check(
            0 <= self.seed <= MAX_SEED,
            f"seed must be an integer in [0, {MAX_SEED}] (each rank seeds numpy with seed * 1000 + rank), "
            f"got {self.seed}",
        )
        err.choice("precision", self.precision, PRECISIONS)
        err.choice("kernels", self.kernels, KERNEL_BACKENDS)
        err.choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        err.choice("compile_mode", self.compile_mode, COMPILE_MODES)
        err.choice("device", self.device, DEVICES)
        err.choice("ckpt_verify", self.ckpt_verify, VERIFY_MODES)
        err.choice("progress", self.progress, PROGRESS_MODES)
        err.choice("ablation", self.ablation, tuple(ABLATIONS))
        err.check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        err.check(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        err.check(
            self.global_batch >= 1 and self.micro_batch >= 1, "global_batch and micro_batch must be >= 1"
        )
        if self.micro_batch >= 1:  # (the ">= 1" message above covers 0; no ZeroDivisionError here)
            err.check(
                self.global_batch % self.micro_batch == 0,
                f"global_batch {self.global_batch} must be a multiple of micro_batch {self.micro_batch}",
            )
        for name in ("log_every", "image_every", "ckpt_every", "keep_last"):
            err.check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        err.check(self.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {self.max_nonfinite}")
        try:
            self.nan_steps()
        except ValueError:
            err.check(
                False, f"debug_nan_steps must be comma-separated integers, got {self.debug_nan_steps!r}"
            )
        err.check(self.data.num_workers >= 0, "data.num_workers must be >= 0")
        err.choice("data.crop", self.data.crop, CROPS)
        err.check(self.data.eval_images >= 1, "data.eval_images must be >= 1")
        err.check(self.data.stats_images >= 0, "data.stats_images must be >= 0 (0 = all)")
        err.check(self.data.online_eval_images >= 2, "data.online_eval_images must be >= 2 (rFID needs two)")
        err.check(self.eval_every >= 0, f"eval_every must be >= 0 (0 = off), got {self.eval_every}")

        o = self.optim
        err.check(o.lr >= 0, f"optim.lr must be >= 0 (0 = scale blr by the batch), got {o.lr}")
        err.check(o.blr > 0 or o.lr > 0, f"optim.blr must be > 0, got {o.blr}")
        err.check(o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}")
        err.choice("optim.schedule", o.schedule, LR_SCHEDULES)
        err.choice("optim.fused", o.fused, FUSED_CHOICES)
        for name in ("warmup_epochs", "hold_epochs", "decay_end_epochs", "weight_decay", "grad_clip"):
            err.check(getattr(o, name) >= 0, f"optim.{name} must be >= 0, got {getattr(o, name)}")
        err.check(
            0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
            f"optim.beta1 and optim.beta2 must lie in [0, 1), got {o.beta1}, {o.beta2}",
        )
        err.check(0 <= o.ema_decay < 1, f"optim.ema_decay must lie in [0, 1), got {o.ema_decay}")

        lo = self.loss
        for name in ("mse", "perceptual", "kl", "semantic", "gan", "gan_start_epoch"):
            err.check(getattr(lo, name) >= 0, f"loss.{name} must be >= 0, got {getattr(lo, name)}")
        err.choice("loss.perceptual_weights", lo.perceptual_weights, PERCEPTUAL_WEIGHTS)
        err.choice("loss.perceptual_precision", lo.perceptual_precision, PERCEPTUAL_PRECISIONS)
        err.choice("loss.semantic_tokens", lo.semantic_tokens, SEMANTIC_TOKENS)
        err.check(
            lo.perceptual_resize >= 32, f"loss.perceptual_resize must be >= 32, got {lo.perceptual_resize}"
        )
        err.check(lo.disc_ndf >= 1 and lo.disc_layers >= 1, "loss.disc_ndf and loss.disc_layers must be >= 1")

        t = self.tok
        err.choice("tok.preset", t.preset, tuple(TOKENIZER_PRESETS))
        err.choice("tok.teacher", t.teacher, TEACHER_CHOICES)
        err.choice("tok.teacher_targets", t.teacher_targets, TARGET_MODES)
        err.choice("tok.noise_schedule", t.noise_schedule, NOISE_SCHEDULES)
        err.check(t.token_channels >= 0, f"tok.token_channels must be >= 0, got {t.token_channels}")
        err.check(t.img_size >= 0, f"tok.img_size must be >= 0 (0 = the preset's), got {t.img_size}")
        err.check(
            -1.0 < t.mask_ratio_min <= t.mask_ratio_max < 1.0,
            f"mask ratio range must satisfy -1 < tok.mask_ratio_min <= tok.mask_ratio_max < 1, "
            f"got ({t.mask_ratio_min}, {t.mask_ratio_max})",
        )
        err.check(t.timestep_shift >= 0 and t.gamma >= 0, "tok.timestep_shift and tok.gamma must be >= 0")
        if self.stage == "decoder":
            err.check(bool(t.init_from), "the decoder stage needs --tok.init_from <stage-1 checkpoint>")
            err.check(
                lo.kl == 0 and lo.semantic == 0,
                "the decoder stage trains only the pixel decoder (frozen encoder, no teacher): "
                f"loss.kl and loss.semantic must be 0, got {lo.kl}, {lo.semantic}",
            )

        d = self.dit
        err.check(0 <= d.label_dropout < 1, f"dit.label_dropout must lie in [0, 1), got {d.label_dropout}")
        err.check(d.time_shift >= 0 and d.num_classes >= 0, "dit.time_shift and dit.num_classes must be >= 0")
        err.check(d.sample_steps >= 2, f"dit.sample_steps must be >= 2, got {d.sample_steps}")
        err.choice("dit.preset", d.preset, tuple(DIT_DH_PRESETS))
        err.choice("dit.parallel", d.parallel, DISTRIBUTED)
        if self.stage == "dit":
            err.check(
                bool(d.tokenizer_ckpt), "the dit stage needs --dit.tokenizer_ckpt <tokenizer checkpoint>"
            )
        err.raise_if_any()
        return self


class _Errors:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self._nonfinite: list[str] = []

    def nonfinite(self, key: str, value: float) -> None:
        self.messages.append(f"{key} must be a finite number, got {value}")
        self._nonfinite.append(key)

    def check(self, ok: bool, message: str) -> None:
        # A range check naming a field already reported as inf / NaN is dropped (NaN fails every
        # comparison), so that each bad field reads as one line, not two.
        if not ok and not any(
            re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", message) for k in self._nonfinite
        ):
            self.messages.append(message)

    def choice(self, name: str, value: str, choices: tuple[str, ...]) -> None:
        self.check(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(self.messages))


# ---------------------------------------------------------------------- presets
_TINY_COMMON = {
    "run_dir": "runs/demo",
    "precision": "fp32",
    "global_batch": 32,
    "micro_batch": 32,
    "log_every": 10,
    "ckpt_every": 200,
    "keep_last": 2,
    "data.path": "demo",
    "data.num_workers": 0,
    "data.eval_images": 16,
}

# The paper's DiT^DH recipe, shared by the XL generator and the S AutoGuidance weak model.
_DIT_RECIPE: dict[str, Any] = {
    "global_batch": 1024,
    "optim.lr": 2e-4,
    "optim.min_lr": 2e-5,
    "optim.schedule": "const_linear",
    "optim.warmup_epochs": 0,
    "optim.hold_epochs": 40,
    "optim.decay_end_epochs": 800,
    "optim.weight_decay": 0.0,
    "optim.grad_clip": 1.0,
    "optim.ema_decay": 0.9995,
    "image_every": 5000,
}

PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # Stage 1 of the release: 200 epochs, batch 1024, lr 1e-4 * 1024 / 256, 50 warm-up epochs, cosine.
    ("tokenizer", "rectok-B"): {
        "run_dir": "runs/rectok-B",
        "epochs": 200,
        "global_batch": 1024,
        "micro_batch": 64,
        "tok.preset": "rectok-B",
        "tok.teacher": "dinov3",
        "tok.teacher_targets": "release",
        "optim.blr": 1e-4,
        "optim.warmup_epochs": 50,
        "optim.grad_clip": 3.0,
        "optim.ema_decay": 0.999,
        "loss.gan_start_epoch": 100,
        "eval_every": 10,  # online PSNR / SSIM / rFID on 5k held-out images (not the paper's protocol)
    },
    # Stage 2: pixel decoder only, 100 epochs, lr 5e-5 * 1024 / 256, 5% warm-up, GAN from epoch 0.
    ("decoder", "rectok-B"): {
        "run_dir": "runs/rectok-B-decoder",
        "epochs": 100,
        "global_batch": 1024,
        "micro_batch": 64,
        "tok.preset": "rectok-B",
        "tok.gamma": 0.0,
        "tok.mask_ratio_min": 0.0,
        "tok.mask_ratio_max": 0.0,
        "optim.blr": 5e-5,
        "optim.warmup_epochs": 5,
        "loss.kl": 0.0,
        "loss.semantic": 0.0,
        "loss.gan_start_epoch": 0,
    },
    # DiT^DH-XL: lr 2e-4 constant to epoch 40, linear to 2e-5 at epoch 800; 80-epoch headline run.
    ("dit", "dit-dh-xl"): {
        **_DIT_RECIPE,
        "run_dir": "runs/dit-dh-xl",
        "epochs": 80,
        "micro_batch": 128,
        "dit.preset": "dit-dh-xl",
    },
    # DiT^DH-S trained 30 epochs with the same recipe: the AutoGuidance weak model.
    ("dit", "dit-dh-s"): {
        **_DIT_RECIPE,
        "run_dir": "runs/dit-dh-s",
        "epochs": 30,
        "micro_batch": 256,
        "dit.preset": "dit-dh-s",
    },
    # CPU demo (`python train.py`): tiny tokenizer, untrained tiny teacher, demo images, 600 steps.
    # Perceptual nets are off (random VGG/ConvNeXt would measure nothing and cost most of the CPU
    # time) and so is the GAN (a few hundred steps are too few for it to help; --loss.gan 0.5
    # turns it on, and the tiny decoder stage trains with it from epoch 0).
    ("tokenizer", "tiny"): {
        **_TINY_COMMON,
        "epochs": 60,
        "image_every": 100,
        "tok.preset": "rectok-tiny",
        "tok.teacher": "tiny",
        "tok.teacher_weights": "random",
        "optim.lr": 1e-3,
        "optim.warmup_epochs": 2,
        "optim.min_lr": 1e-5,
        "optim.ema_decay": 0.99,
        "loss.perceptual": 0.0,
        "loss.perceptual_weights": "random",
        "loss.gan": 0.0,
        "loss.disc_ndf": 16,
    },
    # Stage 2 on the demo tokenizer: exercises the frozen-encoder / fresh-GAN path. Without a
    # perceptual loss and with 50 steps the GAN term costs PSNR here (it buys realism at scale).
    ("decoder", "tiny"): {
        **_TINY_COMMON,
        "run_dir": "runs/demo-decoder",
        "epochs": 5,
        "image_every": 100,
        "tok.preset": "rectok-tiny",
        "tok.gamma": 0.0,
        "tok.mask_ratio_min": 0.0,
        "tok.mask_ratio_max": 0.0,
        "tok.init_from": "runs/demo",
        "optim.lr": 5e-5,
        "optim.warmup_epochs": 0.25,
        "optim.ema_decay": 0.99,
        "loss.kl": 0.0,
        "loss.semantic": 0.0,
        "loss.perceptual": 0.0,
        "loss.perceptual_weights": "random",
        "loss.gan_start_epoch": 0,
        "loss.disc_ndf": 16,
    },
    ("dit", "tiny"): {
        **_TINY_COMMON,
        "run_dir": "runs/demo-dit",
        "epochs": 20,
        "image_every": 200,
        "dit.preset": "dit-dh-tiny",
        "dit.tokenizer_ckpt": "runs/demo",
        "dit.sample_steps": 20,
        "optim.lr": 1e-3,
        "optim.min_lr": 1e-4,
        "optim.schedule": "const_linear",
        "optim.warmup_epochs": 0,
        "optim.hold_epochs": 10,
        "optim.weight_decay": 0.0,
        "optim.grad_clip": 1.0,
        "optim.ema_decay": 0.99,
    },
}


# The rows of the paper's tokenizer ablations, each a named set of overrides applied on top of any
# tokenizer preset (`--ablation NAME`, recorded in config.json and metrics.json): Flow Semantic
# Distillation (the semantic decoder on z_t vs the clean z), the semantic loss's tokens (RAD:
# visible tokens align, masked ones are reconstructed), the latent width C, the teacher, and the
# noise schedule of the forward flow. The paper's own setting is the empty name.
ABLATIONS: dict[str, dict[str, Any]] = {
    "": {},
    "no-fsd": {"tok.semantic_flow": False},
    "align-only": {"loss.semantic_tokens": "visible"},
    "recon-only": {"loss.semantic_tokens": "masked"},
    **{f"c{c}": {"tok.token_channels": c} for c in (16, 32, 64, 128)},
    "dinov2": {"tok.teacher": "dinov2"},
    "dinov3": {"tok.teacher": "dinov3"},
    **{f"schedule-{s}": {"tok.noise_schedule": s} for s in NOISE_SCHEDULES},
}


def preset_names(stage: str) -> list[str]:
    return [name for s, name in PRESETS if s == stage]


# ---------------------------------------------------------------------- overrides
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _sections() -> dict[str, type]:
    hints = _field_types(TrainConfig)
    return {name: tp for name, tp in hints.items() if dataclasses.is_dataclass(tp)}


def leaf_fields() -> dict[str, Any]:
    """Dotted name -> type for every settable field ("epochs", "optim.lr", ...)."""
    out: dict[str, Any] = {}
    sections = _sections()
    for name, tp in _field_types(TrainConfig).items():
        if name in sections:
            for sub, sub_tp in _field_types(tp).items():
                out[f"{name}.{sub}"] = sub_tp
        else:
            out[name] = tp
    return out


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """A JSON / CLI value converted to the field's type, or ValueError naming the key."""
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {tp.__name__}") from None
    raise TypeError(f"unsupported config field type {tp} for {key}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Set dotted keys ("optim.lr": 1e-4) in place; unknown keys raise ValueError with suggestions."""
    leaves = leaf_fields()
    for key, value in overrides.items():
        if key not in leaves:
            close = [k for k in leaves if key.split(".")[-1] in k]
            hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        value = _coerce(key, value, leaves[key])
        if "." in key:
            section, name = key.split(".", 1)
            setattr(getattr(cfg, section), name, value)
        else:
            setattr(cfg, key, value)
    return cfg


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved with to_dict() (e.g. from a checkpoint); unknown keys raise."""
    return apply_overrides(TrainConfig(), _flatten(d)).validate()


def train_config(stage: str = "tokenizer", preset: str = "tiny", **overrides: Any) -> TrainConfig:
    """defaults -> preset (stage, preset) -> ablation (overrides["ablation"], ABLATIONS) -> overrides
    (dotted keys, or nested via "__": optim__lr)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if (stage, preset) not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r} for stage {stage!r}; choose one of {', '.join(preset_names(stage))}"
        )
    overrides = {k.replace("__", "."): v for k, v in overrides.items()}
    cfg = _preset_config(stage, preset, overrides.pop("ablation", ""))
    return apply_overrides(cfg, overrides).validate()


def _preset_config(stage: str, preset: str, ablation: str) -> TrainConfig:
    """defaults -> preset -> ablation, not validated yet: a preset may leave a required input (the
    decoder stage's --tok.init_from) to the command line."""
    cfg = apply_overrides(TrainConfig(stage=stage, preset=preset), PRESETS[(stage, preset)])
    apply_overrides(cfg, ablation_overrides(stage, ablation))
    cfg.ablation = ablation
    return cfg


def ablation_overrides(stage: str, name: str) -> dict[str, Any]:
    """The overrides of ablation `name` (ABLATIONS); only the tokenizer stage has ablations."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {', '.join(n for n in ABLATIONS if n)}")
    if name and stage != "tokenizer":
        raise ValueError(f"--ablation {name} applies to the tokenizer stage, not --stage {stage}")
    return ABLATIONS[name]


def _field_comments() -> dict[str, str]:
    """Dotted key -> the `# comment` beside its dataclass field (used as --help text)."""
    import inspect

    out: dict[str, str] = {}
    for prefix, cls in [("", TrainConfig), *((f"{n}.", t) for n, t in _sections().items())]:
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
            if m:
                out[prefix + m.group(1)] = m.group(2)
    return out


def build_parser() -> argparse.ArgumentParser:
    """argparse built from the dataclass fields: --optim.lr etc., plus --lr where the leaf name is unique."""
    parser = argparse.ArgumentParser(
        description="Train RecTok (tokenizer stage 1 / decoder stage 2) or DiT^DH. "
        "With no arguments: the CPU demo (tiny tokenizer on generated images).",
        epilog="Defaults shown are those of --stage tokenizer --preset tiny; a preset sets its own.",
    )
    parser.add_argument("--config", default="", help="JSON file of overrides (e.g. a saved config.json)")
    leaves = leaf_fields()
    comments = _field_comments()
    defaults = _flatten(train_config("tokenizer", "tiny").to_dict())
    counts: dict[str, int] = {}
    for key in leaves:
        counts[key.split(".")[-1]] = counts.get(key.split(".")[-1], 0) + 1
    for key, tp in leaves.items():
        short = key.split(".")[-1]
        flags = [f"--{key}"] + (
            [f"--{short}"] if "." in key and counts[short] == 1 and short not in leaves else []
        )
        text = f"{LONG_HELP.get(key, comments.get(key, ''))} (default: {defaults[key]!r})".strip()
        kwargs: dict[str, Any] = {
            "dest": key,
            "default": argparse.SUPPRESS,
            "metavar": tp.__name__.upper(),
            "help": text.replace("%", "%%"),
        }
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """defaults -> preset -> ablation -> --config JSON -> command-line values; validated."""
    args = vars(build_parser().parse_args(argv))
    file_overrides: dict[str, Any] = {}
    if args.get("config"):
        with open(args.pop("config")) as f:
            file_overrides = _flatten(json.load(f))
    args.pop("config", None)
    stage = args.get("stage", file_overrides.get("stage", "tokenizer"))
    preset = args.get("preset", file_overrides.get("preset", "tiny"))
    ablation = args.get("ablation", file_overrides.get("ablation", ""))
    if stage not in STAGES or (stage, preset) not in PRESETS:
        return train_config(stage, preset)  # the error message that names the choices
    cfg = _preset_config(stage, preset, ablation)
    chosen = ("stage", "preset", "ablation")
    apply_overrides(cfg, {k: v for k, v in file_overrides.items() if k not in chosen})
    apply_overrides(cfg, {k: v for k, v in args.items() if k not in chosen})
    return cfg.validate()


def format_config(cfg: TrainConfig) -> str:
    """The resolved config as indented JSON (what is printed at start and saved as config.json)."""
    return json.dumps(cfg.to_dict(), indent=2)
