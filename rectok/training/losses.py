"""Tokenizer losses (SPEC section 4), computed in float32 on images in [0, 1].

    L = mse * MSE(x_hat, x) + perceptual * P + kl * KL + semantic * S + gan * G

- P = (1.0 * LPIPS-VGG16 + 0.1 * MSE(ConvNeXt-S logits)) / 1.1, both nets frozen, ImageNet weights.
- KL = 0.5 * sum(mean^2 + var - 1 - logvar) over tokens and channels, mean over the batch.
- S = mean over all tokens of 1 - cos(semantic_decoder(z_t), teacher features).
- G = -mean(D(x_hat)) for the PatchGAN D; D itself minimises the hinge loss
  0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))).

Pretrained weights are read from local files only (never downloaded): see
`find_weights` for where they are looked for. `weights="random"` builds randomly
initialised perceptual nets for tests and CPU demos and says so loudly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from rectok import kernels
from rectok.models.discriminator import PatchDiscriminator

log = logging.getLogger(__name__)


# torchvision's ImageNet weights, under the file names torch.hub caches them with.
# VGG16 IMAGENET1K_V1 is the trunk LPIPS was calibrated on; ConvNeXt-S IMAGENET1K_V1 is
# the logit network of the RecTok release.
VGG16_FILE = "vgg16-397923af.pth"
CONVNEXT_S_FILE = "convnext_small-0c510722.pth"
# The same files as the release's `offline_models/` folder names them, so that
# `--loss.weights_dir offline_models` works on a copy of a release setup: its VGG16 trunk is
# `vgg16.pth`, and its LPIPS linear heads (taming-transformers' `vgg.pth`, the LPIPS v0.1 heads)
# sit in `lpips/vgg.pth`. Without that file the heads bundled with the `lpips` package are used.
VGG16_ALIASES = (VGG16_FILE, "vgg16.pth")
LPIPS_HEADS_FILES = ("lpips/vgg.pth", "vgg.pth")
WEIGHT_URLS = {
    VGG16_FILE: "https://download.pytorch.org/models/vgg16-397923af.pth",
    CONVNEXT_S_FILE: "https://download.pytorch.org/models/convnext_small-0c510722.pth",
}
WEIGHT_MODES = ("pretrained", "random")
PERCEPTUAL_PRECISIONS = ("fp32", "bf16")  # of the frozen LPIPS / ConvNeXt forwards


def weight_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for weight files: `weights_dir`, $RECTOK_WEIGHTS_DIR, the torch hub cache."""
    dirs = [Path(weights_dir)] if weights_dir else []
    if os.environ.get("RECTOK_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["RECTOK_WEIGHTS_DIR"]))
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weights(
    filename: str, weights_dir: str | os.PathLike | None = None, aliases: tuple[str, ...] = ()
) -> Path:
    """Path of a local weight file (under `filename` or one of its `aliases`), or FileNotFoundError
    saying where to put it."""
    dirs = weight_dirs(weights_dir)
    for d in dirs:
        for name in (filename, *aliases):
            if (d / name).is_file():
                return d / name
    url = WEIGHT_URLS.get(filename, "")
    raise FileNotFoundError(
        f"weight file {filename} not found in: {', '.join(str(d) for d in dirs)}. "
        f"Download it on a connected machine{f' from {url}' if url else ''} and copy it into one of these "
        "folders (or set RECTOK_WEIGHTS_DIR / --loss.weights_dir). "
        "RecTok never downloads weights at run time. "
        "For a quick CPU check without weights use weights='random' (the loss is then meaningless)."
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _warn_random(what: str) -> None:
    msg = (
        f"!!! {what} uses RANDOMLY INITIALISED networks (weights='random'): the perceptual loss is "
        "meaningless for real training. Use weights='pretrained' with local weight files. !!!"
    )
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


def convnext_torchvision_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ConvNeXt state dict (features.*, classifier.*) to timm's layout."""
    out = {}
    for k, v in state.items():
        if k.startswith("features.0."):
            k = "stem." + k[len("features.0.") :]
        elif m := re.match(r"features\.(\d+)\.(\d+)\.(.*)", k):
            idx, sub, rest = int(m.group(1)), m.group(2), m.group(3)
            if idx % 2 == 1:  # stage (idx - 1) / 2: CNBlocks
                block = f"stages.{(idx - 1) // 2}.blocks.{sub}."
                if rest == "layer_scale":
                    k, v = block + "gamma", v.reshape(-1)
                else:
                    part, _, leaf = rest.partition(".")  # block.<i>.weight
                    assert part == "block", k
                    i, leaf = leaf.split(".", 1)
                    k = block + {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}[i] + "." + leaf
            else:  # downsample before stage idx / 2: (LayerNorm2d, Conv2d)
                k = f"stages.{idx // 2}.downsample.{sub}.{rest}"
        elif k.startswith("classifier.0."):
            k = "head.norm." + k[len("classifier.0.") :]
        elif k.startswith("classifier.2."):
            k = "head.fc." + k[len("classifier.2.") :]
        out[k] = v
    return out


def build_convnext_small(weights: str, weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """timm ConvNeXt-S with 1000 ImageNet logits, frozen and in eval mode."""
    import timm

    path = find_weights(CONVNEXT_S_FILE, weights_dir) if weights == "pretrained" else None
    model = timm.create_model("convnext_small", pretrained=False, num_classes=1000)
    if path is not None:
        state = _read_state(path)
        if any(k.startswith("features.") for k in state):
            state = convnext_torchvision_to_timm(state)
        model.load_state_dict(state, strict=True)
        log.info("ConvNeXt-S weights from %s", path)
    return model.eval().requires_grad_(False)


def build_lpips_vgg(weights: str, weights_dir: str | os.PathLike | None = None) -> nn.Module:
    """LPIPS with the VGG16 trunk. Its calibrated linear layers ship inside the `lpips` package;
    the VGG16 ImageNet trunk comes from a local torchvision weight file."""
    import lpips  # a base dependency, imported here because it is slow to import

    path = find_weights(VGG16_FILE, weights_dir, VGG16_ALIASES[1:]) if weights == "pretrained" else None
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=` flag
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand=True: build the trunk without torchvision's download; filled below.
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        state = _read_state(path)
        # lpips slices torchvision's vgg.features into slice1..5 keeping the feature indices as names.
        trunk = {}
        for name in model.net.state_dict():
            idx_leaf = name.split(".", 1)[1]  # "slice2.5.weight" -> "5.weight"
            trunk[name] = state[f"features.{idx_leaf}"]
        model.net.load_state_dict(trunk, strict=True)
        log.info("LPIPS VGG16 trunk from %s", path)
        found = (d / f for d in weight_dirs(weights_dir) for f in LPIPS_HEADS_FILES if (d / f).is_file())
        heads = next(found, None)
        if heads is not None:
            load_lpips_heads(model, heads)
    return model.eval().requires_grad_(False)


def load_lpips_heads(model: nn.Module, path: Path) -> None:
    """The five 1x1 linear heads of LPIPS from a taming-transformers / release `vgg.pth`
    (keys `lin{i}.model.1.weight`) into an `lpips.LPIPS` model."""
    state = _read_state(path)
    with torch.no_grad():
        for i, lin in enumerate(model.lins):
            key = f"lin{i}.model.1.weight"
            if key not in state or state[key].shape != lin.model[-1].weight.shape:
                raise ValueError(
                    f"{path} is not an LPIPS-VGG heads file: expected {key} of shape "
                    f"{tuple(lin.model[-1].weight.shape)} (the release's offline_models/lpips/vgg.pth)"
                )
            lin.model[-1].weight.copy_(state[key])
    log.info("LPIPS linear heads from %s", path)


class PerceptualLoss(nn.Module):
    """(w_l * LPIPS-VGG16 + w_c * MSE(ConvNeXt-S logits)) / (w_l + w_c), w_l = 1.0, w_c = 0.1 by default.

    forward(x_hat, x) with images [B, 3, H, W] in [0, 1] -> float32 scalar. LPIPS runs at the
    input resolution on [-1, 1] images; ConvNeXt on a bilinear antialiased resize to
    `resize` (224) with ImageNet normalisation, as in the release.

    Speed options (off by default: the release runs both nets in float32, NCHW):
    `precision="bf16"` runs the two frozen nets under bf16 autocast (the loss stays float32);
    `channels_last=True` keeps their convolutions in NHWC, the layout cuDNN's and oneDNN's fast
    kernels use (the same math; the sums may round differently). bench/perceptual.py times them.
    """

    def __init__(
        self,
        weights: str = "pretrained",
        weights_dir: str | os.PathLike | None = None,
        lpips_weight: float = 1.0,
        convnext_weight: float = 0.1,
        resize: int = 224,
        precision: str = "fp32",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if precision not in PERCEPTUAL_PRECISIONS:
            choices = ", ".join(PERCEPTUAL_PRECISIONS)
            raise ValueError(f"perceptual precision must be one of {choices}; got {precision!r}")
        if weights not in WEIGHT_MODES:
            raise ValueError(f"perceptual weights must be one of {WEIGHT_MODES}, got {weights!r}")
        if lpips_weight < 0 or convnext_weight < 0 or lpips_weight + convnext_weight <= 0:
            raise ValueError(
                f"perceptual weights must be >= 0 with a positive sum, got {lpips_weight}, {convnext_weight}"
            )
        if weights == "random":
            _warn_random("PerceptualLoss")
        self.lpips_weight, self.convnext_weight, self.resize = lpips_weight, convnext_weight, resize
        self.lpips = build_lpips_vgg(weights, weights_dir) if lpips_weight > 0 else None
        self.convnext = build_convnext_small(weights, weights_dir) if convnext_weight > 0 else None
        self.precision, self.channels_last = precision, channels_last
        if channels_last:
            for net in (self.lpips, self.convnext):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        # Frozen feature nets stay in eval mode whatever the caller does (no dropout in LPIPS' heads).
        return super().train(False)

    def _nets(self):
        """The context the two frozen nets run in: bf16 autocast or none."""
        if self.precision == "bf16":
            return torch.autocast(self.mean.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_hat, x = x_hat.float(), x.float()
        total = x.new_zeros(())
        if self.lpips is not None:
            with self._nets():
                d = self.lpips(self._layout(x_hat * 2 - 1), self._layout(x * 2 - 1))
            total = total + self.lpips_weight * d.float().mean()
        if self.convnext is not None:
            size = (self.resize, self.resize)
            a = F.interpolate(x_hat, size=size, mode="bilinear", antialias=True)
            b = F.interpolate(x, size=size, mode="bilinear", antialias=True)
            with self._nets():
                logits_hat = self.convnext(self._layout((a - self.mean) / self.std))
                with torch.no_grad():
                    logits = self.convnext(self._layout((b - self.mean) / self.std))
            total = total + self.convnext_weight * F.mse_loss(logits_hat.float(), logits.float())
        return total / (self.lpips_weight + self.convnext_weight)


@dataclass
class LossWeights:
    """Weights of the tokenizer loss terms; the defaults are the release's stage-1 recipe."""

    mse: float = 1.0
    perceptual: float = 1.0
    kl: float = 1e-6
    semantic: float = 1.0
    gan: float = 0.5

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value >= 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) for mean, logvar [B, L, C]: summed over tokens and channels,
    averaged over the batch, in float32; logvar clamped to [-30, 20] as the posterior does."""
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


# Which tokens the semantic loss covers: all (the paper: visible tokens align, masked ones are
# reconstructed), visible (its "alignment only" ablation) or masked ("reconstruction only").
SEMANTIC_TOKENS = ("all", "visible", "masked")


def semantic_token_ids(mask, which: str) -> torch.Tensor | None:
    """Indices [B, n] into the L tokens that the semantic loss covers for masking `mask`
    (rectok.models.flow.MaskIds), or None for all of them."""
    if which not in SEMANTIC_TOKENS:
        raise ValueError(f"semantic tokens must be one of {', '.join(SEMANTIC_TOKENS)}, got {which!r}")
    if which == "all":
        return None
    return mask.ids_keep if which == "visible" else mask.ids_shuffle[:, mask.len_keep :]


def semantic_loss(
    pred: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the tokens [B, L, D] of 1 - cos(pred, target): FSD on visible, RAD on masked tokens.
    `tokens` [B, n]: only those positions (semantic_token_ids); a step without any (no masked token
    for "masked") gives 0 with the graph kept, so every parameter still gets a (zero) gradient."""
    if tokens is not None:
        if tokens.shape[1] == 0:
            return kernels.cosine_distill_loss(pred, target, eps=1e-12) * 0.0
        index = tokens[..., None].expand(-1, -1, pred.shape[-1])
        pred, target = pred.gather(1, index), target.gather(1, index)
    # eps = 1e-12 as F.normalize in the release (it only matters for near-zero vectors).
    return kernels.cosine_distill_loss(pred, target, eps=1e-12)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))), in float32."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(x_hat)), in float32."""
    return -logits_fake.float().mean()


class DiscriminatorLoss(nn.Module):
    """Hinge loss of a PatchGAN on (real, fake) in one forward call.

    Real and fake go through D separately (BatchNorm statistics per set, as in the
    release) but inside one `forward`, so a DDP wrapper sees one forward per backward.
    forward(x, x_hat) -> dict(d_loss, logits_real, logits_fake); images in [0, 1].
    """

    def __init__(self, discriminator: PatchDiscriminator | None = None) -> None:
        super().__init__()
        self.discriminator = discriminator if discriminator is not None else PatchDiscriminator()

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_real = self.discriminator(x.detach().float())
        logits_fake = self.discriminator(x_hat.detach().float())
        return {
            "d_loss": hinge_d_loss(logits_real, logits_fake),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }


def tokenizer_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    weights: LossWeights,
    *,
    perceptual: PerceptualLoss | None = None,
    posterior: Any = None,
    semantic_pred: torch.Tensor | None = None,
    semantic_target: torch.Tensor | None = None,
    semantic_tokens: torch.Tensor | None = None,
    discriminator: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The generator-side tokenizer loss; every term in float32.

    x, x_hat: images [B, 3, H, W] in [0, 1] (x_hat = the decoder output mapped to [0, 1],
    not clamped, so that gradients flow everywhere). posterior: anything with `.mean` and
    `.logvar` [B, L_keep, C] (rectok.tokenizer.DiagonalGaussian).
    semantic_pred / semantic_target: [B, L, D]; semantic_tokens: the positions [B, n] the semantic
    term covers (semantic_token_ids; None: all). discriminator: the raw (unwrapped) D, or None
    while the GAN is off; its parameters get no gradient from this loss.

    Returns {"loss": weighted total, "mse", "perceptual", "kl", "semantic", "gan_g": unweighted
    terms (zeros for terms that are switched off)} -- all scalars.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"tokenizer_loss: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ")
    x, x_hat = x.float(), x_hat.float()
    zero = x.new_zeros(())
    terms = {"mse": F.mse_loss(x_hat, x), "perceptual": zero, "kl": zero, "semantic": zero, "gan_g": zero}
    if weights.perceptual > 0:
        if perceptual is None:
            raise ValueError("perceptual weight > 0 but no PerceptualLoss module was given")
        terms["perceptual"] = perceptual(x_hat, x)
    if weights.kl > 0 and posterior is not None:
        terms["kl"] = kl_loss(posterior.mean, posterior.logvar)
    if weights.semantic > 0 and semantic_pred is not None:
        if semantic_target is None:
            raise ValueError("semantic prediction given without teacher features")
        terms["semantic"] = semantic_loss(semantic_pred, semantic_target, semantic_tokens)
    if weights.gan > 0 and discriminator is not None:
        # D is only a critic here: build the graph without its parameters so the generator's
        # backward leaves D's gradients untouched (the release toggles requires_grad the same way).
        flags = [p.requires_grad for p in discriminator.parameters()]
        discriminator.requires_grad_(False)
        try:
            terms["gan_g"] = generator_adv_loss(discriminator(x_hat))
        finally:
            for p, flag in zip(discriminator.parameters(), flags):
                p.requires_grad_(flag)
    total = (
        weights.mse * terms["mse"]
        + weights.perceptual * terms["perceptual"]
        + weights.kl * terms["kl"]
        + weights.semantic * terms["semantic"]
        + weights.gan * terms["gan_g"]
    )
    return {"loss": total, **terms}
