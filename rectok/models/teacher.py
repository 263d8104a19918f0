"""The frozen vision foundation model whose patch features the semantic decoder learns (SPEC section 3).

Official teacher: DINOv3 ViT-L/16 (`vit_large_patch16_dinov3.lvd1689m` in timm). The targets are
the patch tokens after the final norm, without the class and register tokens: [B, 256, 1024] at
256 px, one per latent token. DINOv2 ViT-L/14 (`vit_large_patch14_dinov2.lvd142m`) is fed at
(256 / 16) * 14 = 224 px so that its 14 px patches give the same 16 x 16 grid.

Two ways to compute the targets (`targets=`):

- "release" (the default, and what the paper's presets use) reproduces what the official release
  really computes during training, quirks included:
  * DINOv3: the image in [-1, 1] is first brought back to the loader's uint8 levels (rounding, so
    any loader's float formula gives the same result), then through the release's own float path
    (ToTensor + Normalize(0.5, 0.5)), back to [0, 1], and *floored* to uint8 by
    `(x01 * 255).to(torch.uint8)` (about one pixel level in five drops by one); then the HF
    DINOv3ViTImageProcessorFast (x * (1/255), bilinear antialiased resize to 224, ImageNet
    mean/std) and a bilinear resize (no antialias) back to the image size.
  * The teacher runs in train mode: the release's `model.train(True)` each epoch recurses into the
    teacher, and DINOv3 in train mode multiplies its RoPE patch coordinates by one log-uniform
    factor in [1/2, 2] per forward call (`pos_embed_rescale = 2.0` in the HF config). Nothing else
    changes (no dropout, no drop-path). So `Teacher(...).train()` applies this rescale and
    `.eval()` gives the release's deterministic eval-mode targets.
  * DINOv2: the release's branch crashes as shipped (a float size passed to F.interpolate). We
    implement its evident intent, timm's eval transform of `vit_large_patch14_dinov2.lvd142m`
    (bicubic antialiased resize to 518, ImageNet normalisation) followed by the bilinear resize
    (no antialias) to 14 * grid. This is our reading of a broken path, not a measured behaviour.
- "clean": deterministic targets without the quirks: no uint8 floor, an antialiased bilinear
  resize of [0, 1] images to 224, ImageNet normalisation, bilinear back to the feed size, and the
  teacher always in eval mode (no RoPE rescale).

Weights never come from the network: a local file (timm layout as on the HF hub, or Meta's
original checkpoint; .safetensors or a .pth read with weights_only=True), else the HF hub /
torch hub caches if they already hold them. "random" builds an untrained teacher on explicit
request only (smoke tests); Teacher.tiny() is a small random DINOv3-style ViT for CPU tests.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from rectok.models.teacher_weights import TEACHERS, load_teacher_model, resolve_model_name

log = logging.getLogger(__name__)

TEACHER_CHOICES = (*TEACHERS, "tiny")  # the named DINO teachers, or the built-in tiny ViT
TARGET_MODES = ("release", "clean")
# HF DINOv3ViTConfig.pos_embed_rescale of the released checkpoints: RoPE coordinates are scaled by
# a log-uniform factor in [1 / 2, 2] in train mode.
RELEASE_ROPE_RESCALE = 2.0
# HF DINOv3ViTImageProcessorFast.rescale_factor (1 / 255 as the config stores it).
HF_RESCALE_FACTOR = 0.00392156862745098


def _patch_size(model_name: str) -> int:
    match = re.search(r"patch(\d+)", model_name)
    if match is None:
        raise ValueError(
            f"cannot tell the patch size of teacher {model_name!r} (expected 'patchNN' in the name)"
        )
    return int(match.group(1))


def release_dinov3_input(images: torch.Tensor, resize_to: int, feed_size: int) -> torch.Tensor:
    """The release's DINOv3 input: [B, 3, S, S] in [-1, 1] -> normalised [B, 3, feed, feed] (float32).

    Each step mirrors one operation of the release so that the uint8 floor hits the same pixels.
    """
    u8 = ((images.float() + 1.0) * 127.5).round_().clamp_(0, 255)  # the loader's uint8 levels
    x = (u8 / 255.0 - 0.5) / 0.5  # the release's ToTensor + Normalize(0.5, 0.5)
    x01 = (x + 1) * 0.5
    x = (x01 * 255).to(torch.uint8).float() * HF_RESCALE_FACTOR  # floor, then the processor's rescale
    x = F.interpolate(x, size=(resize_to, resize_to), mode="bilinear", antialias=True, align_corners=False)
    x = (x - _stats(IMAGENET_DEFAULT_MEAN, x)) / _stats(IMAGENET_DEFAULT_STD, x)
    return F.interpolate(x, size=(feed_size, feed_size), mode="bilinear", align_corners=False)


def release_dinov2_input(images: torch.Tensor, eval_size: int, feed_size: int) -> torch.Tensor:
    """Our reading of the release's (crashing) DINOv2 input: timm's eval transform (bicubic
    antialiased resize to `eval_size` = 518, ImageNet normalisation), then bilinear to feed_size."""
    x = (images.float() + 1.0) * 0.5
    x = F.interpolate(x, size=(eval_size, eval_size), mode="bicubic", antialias=True, align_corners=False)
    x = (x - _stats(IMAGENET_DEFAULT_MEAN, x)) / _stats(IMAGENET_DEFAULT_STD, x)
    return F.interpolate(x, size=(feed_size, feed_size), mode="bilinear", align_corners=False)


def clean_input(images: torch.Tensor, resize_to: int, feed_size: int) -> torch.Tensor:
    """Deterministic input without the release's quirks: [0, 1] images, antialiased bilinear to
    `resize_to`, ImageNet normalisation, bilinear to feed_size."""
    x = (images.float() + 1.0) * 0.5
    x = F.interpolate(x, size=(resize_to, resize_to), mode="bilinear", antialias=True, align_corners=False)
    x = (x - _stats(IMAGENET_DEFAULT_MEAN, x)) / _stats(IMAGENET_DEFAULT_STD, x)
    return F.interpolate(x, size=(feed_size, feed_size), mode="bilinear", align_corners=False)


def _stats(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def draw_rope_rescale(max_factor: float, device: torch.device | str | None = None) -> torch.Tensor:
    """One log-uniform factor in [1 / max_factor, max_factor], drawn as HF / Meta DINOv3 draw it."""
    log_max = math.log(max_factor)
    return torch.empty(1, device=device).uniform_(-log_max, log_max).exp()


class ScaledDinoV3Rope(nn.Module):
    """timm's DINOv3 RoPE with the patch coordinates multiplied by a given factor.

    timm can draw the train-mode rescale itself, but from its own RNG call; holding the factor here
    lets a caller inject it (release-parity tests) and keeps timm's module deterministic (eval).
    Same layout as timm's `get_embed`: [sin | cos], each in the rotate-half layout.
    """

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope.eval()
        self.factor: torch.Tensor | None = None

    def train(self, mode: bool = True) -> ScaledDinoV3Rope:
        return super().train(False)

    def get_embed(self, shape: list[int] | tuple[int, int] | None = None, dtype=None) -> torch.Tensor:
        if self.factor is None:
            return self.rope.get_embed(shape, dtype=dtype)
        h, w = shape if shape is not None else self.rope.feat_shape
        periods = self.rope.periods
        axes = [(torch.arange(n, dtype=torch.float32, device=periods.device) + 0.5) / n for n in (h, w)]
        axes = [2 * a - 1 for a in axes]  # patch centres in [-1, 1], per axis
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 1)  # (HW, 2) in [-1, 1]
        coords = coords * self.factor.to(coords)
        angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1)  # (HW, D / 4 * 2)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout
        embed = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return embed if dtype is None else embed.to(dtype)


class Teacher(nn.Module):
    """Frozen timm ViT teacher: images [B, 3, S, S] in [-1, 1] -> patch features [B, (S/16)^2, D] fp32.

    name: "dinov3", "dinov2" or a timm model name. weights: a file path, "random" (explicit
    request only; warns), or None (HF hub / torch hub cache, offline; FileNotFoundError if
    absent). image_size / token_patch: the tokenizer's input size and patch, which fix the
    feature grid (S / token_patch per side). targets: "release" or "clean" (module docstring).
    rope_rescale: the train-mode RoPE rescale of DINOv3 teachers under targets="release" (2.0;
    None switches it off). resize_to: the size of the processor round trip (224).
    model_kwargs: extra timm.create_model arguments (used by tiny()).
    device: where to build (a random teacher can be built on "meta" for shape checks).
    warn_random: warn loudly about random weights (tiny() turns it off: random is its purpose).
    auto_qkv_bias: choose the DINOv3 timm variant with or without q/v biases from the checkpoint
    (None: only when `name` is an alias; see rectok.teacher_weights).

    Never trained: every parameter is frozen and forward runs without autograd, whatever the mode.
    """

    def __init__(
        self,
        name: str = "dinov3",
        weights: str | os.PathLike | None = None,
        *,
        image_size: int = 256,
        token_patch: int = 16,
        targets: str = "release",
        rope_rescale: float | None = RELEASE_ROPE_RESCALE,
        resize_to: int = 224,
        model_kwargs: dict | None = None,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        warn_random: bool = True,
        auto_qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if image_size % token_patch:
            raise ValueError(
                f"image_size {image_size} must be a multiple of the tokenizer patch {token_patch}"
            )
        if targets not in TARGET_MODES:
            raise ValueError(f"teacher targets must be one of {TARGET_MODES}, got {targets!r}")
        if rope_rescale is not None and not rope_rescale >= 1.0:
            raise ValueError(f"rope_rescale must be >= 1 (factors in [1/r, r]) or None, got {rope_rescale}")
        self.model_name = resolve_model_name(name)
        self.grid = image_size // token_patch
        self.teacher_patch = _patch_size(self.model_name.split(".")[0])
        self.feed_size = self.grid * self.teacher_patch  # 256 for DINOv3/16, 224 for DINOv2/14
        self.image_size, self.resize_to, self.targets = image_size, resize_to, targets
        kwargs = dict(num_classes=0, img_size=self.feed_size, **(model_kwargs or {}))
        if weights is not None and str(weights) == "random":
            self.is_random, self.weights_source = True, "random"
            if warn_random:
                msg = (
                    f"teacher {self.model_name} has RANDOM weights (explicitly requested): its features "
                    "carry no semantics, so the semantic loss only checks the plumbing; never use this for "
                    "a real run"
                )
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
            with torch.device(device or "cpu"):
                self.model = timm.create_model(self.model_name, pretrained=False, **kwargs)
        else:
            # Any layout users have (HF transformers, Meta, timm with or without q/v biases), offline;
            # a DINOv3 checkpoint with non-zero q/v biases selects the bias-carrying timm variant.
            self.model, source = load_teacher_model(
                weights, name, cache_dir=cache_dir, auto_qkv_bias=auto_qkv_bias, **kwargs
            )
            self.is_random, self.weights_source = False, source
            if device is not None:
                self.model.to(device)
            log.info("teacher %s loaded from %s", self.model_name, source)

        patch = self.model.patch_embed.patch_size
        if tuple(patch) != (self.teacher_patch, self.teacher_patch):
            raise ValueError(f"{self.model_name} has patch {patch}, expected {self.teacher_patch}")
        self.num_prefix_tokens = self.model.num_prefix_tokens  # class + register tokens (5 for DINOv3)
        self.feature_dim = self.model.num_features
        self.is_dinov3 = type(getattr(self.model, "rope", None)).__name__ == "RotaryEmbeddingDinoV3"
        # The train-mode RoPE rescale is a DINOv3 behaviour of the release; DINOv2 has no RoPE.
        self.rope_rescale = rope_rescale if (targets == "release" and self.is_dinov3) else None
        if self.rope_rescale is not None:
            self.model.rope = ScaledDinoV3Rope(self.model.rope)
        cfg = timm.models.get_pretrained_cfg(self.model_name)
        self.eval_size = int(cfg.input_size[-1]) if cfg is not None else self.feed_size  # 518 for DINOv2
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def tiny(
        cls,
        weights: str | os.PathLike = "random",
        *,
        image_size: int = 64,
        token_patch: int = 16,
        dim: int = 64,
        depth: int = 2,
        heads: int = 2,
        targets: str = "release",
    ) -> Teacher:
        """A small DINOv3-architecture ViT (4 register tokens, RoPE) for CPU tests and the demo.

        Random by default: it checks plumbing, not semantics, so it logs instead of warning.
        """
        if str(weights) == "random":
            log.info("tiny teacher with random weights (for tests and the demo; carries no semantics)")
        return cls(
            "vit_small_patch16_dinov3",
            weights,
            image_size=image_size,
            token_patch=token_patch,
            targets=targets,
            model_kwargs=dict(embed_dim=dim, depth=depth, num_heads=heads),
            warn_random=False,
            auto_qkv_bias=True,  # tiny checkpoints with q/v biases load into the _qkvb variant
        )

    def train(self, mode: bool = True) -> Teacher:
        # The weights stay frozen either way; the mode only switches the release's train-mode RoPE
        # rescale (targets="release", DINOv3). timm's own modules stay in eval mode (no dropout
        # either way, and timm's own RoPE augmentation is never drawn).
        super().train(False)
        self.training = bool(mode)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> the normalised [B, 3, F, F] teacher input (F = feed_size)."""
        if self.targets == "clean":
            return clean_input(images, self.resize_to, self.feed_size)
        if self.is_dinov3:
            return release_dinov3_input(images, self.resize_to, self.feed_size)
        return release_dinov2_input(images, self.eval_size, self.feed_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, rope_rescale: torch.Tensor | float | None = None) -> torch.Tensor:
        """images [B, 3, S, S] in [-1, 1] -> patch features [B, grid^2, D] (float32, no grad).

        In train mode with the release's RoPE rescale on, one factor is drawn per call, unless
        `rope_rescale` gives it (release-parity tests).
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"teacher expects {self.image_size}px images, got {tuple(images.shape[-2:])}")
        if rope_rescale is not None and not (self.training and self.rope_rescale is not None):
            raise ValueError("rope_rescale given, but this teacher applies no RoPE rescale in this mode")
        if self.rope_rescale is not None:
            factor = rope_rescale
            if self.training and factor is None:
                factor = draw_rope_rescale(self.rope_rescale, images.device)
            self.model.rope.factor = None if factor is None else torch.as_tensor(factor, dtype=torch.float32)
        tokens = self.model.forward_features(self.preprocess(images))  # [B, prefix + grid^2, D], final norm
        feats = tokens[:, self.num_prefix_tokens :]
        assert feats.shape[1] == self.grid * self.grid, (feats.shape, self.grid)
        return feats.float()
