"""The frozen vision foundation model whose patch features the semantic decoder learns (SPEC section 3).

Official teacher: DINOv3 ViT-L/16 (`vit_large_patch16_dinov3.lvd1689m` in timm). Its input is
the training image in [-1, 1] mapped to [0, 1], bilinear-resized (antialiased) to 224 px,
ImageNet-normalised, and bilinear-resized back to the image size (256), which reproduces the
release's HF image processor followed by its upsampling. The targets are the patch tokens after
the final norm, without the class and register tokens: [B, 256, 1024] at 256 px, one per latent
token. DINOv2 ViT-L/14 (`vit_large_patch14_dinov2.lvd142m`) gets the same treatment but is fed
at (256 / 16) * 14 = 224 px so that its 14 px patches give the same 16 x 16 grid.

Weights never come from the network: a local file (timm layout as on the HF hub, or Meta's
original checkpoint; .safetensors or a .pth read with weights_only=True), else the HF hub /
torch hub caches if they already hold them. "random" builds an untrained teacher on explicit
request only (smoke tests); Teacher.tiny() is a small random DINOv3-style ViT for CPU tests.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TEACHERS = {
    "dinov3": "vit_large_patch16_dinov3.lvd1689m",
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Files a timm hub repo may hold, in the order timm itself prefers them.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def resolve_model_name(name: str) -> str:
    """'dinov3' / 'dinov2' -> the timm model name; any other timm name passes through."""
    return TEACHERS.get(name, name)


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(hf_home) / "hub"


def find_cached_weights(model_name: str, cache_dir: str | Path | None = None) -> Path | None:
    """A weights file for `model_name` already on disk (HF hub cache, then torch hub), or None.

    Only looks at local files: never contacts the hub.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if cfg.hf_hub_id:
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILENAMES
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:  # timm's URL download lands in the torch hub checkpoint folder
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
    return None


def missing_weights_message(model_name: str, cache_dir: Path) -> str:
    hub_id = f"timm/{model_name}"
    return (
        f"no weights for the teacher {model_name} were found offline (looked in the HF hub cache "
        f"{cache_dir} for {hub_id}, and in {Path(torch.hub.get_dir()) / 'checkpoints'}); "
        "RecTok never downloads at run time.\n"
        f"To get them, on a machine with internet access (DINOv3 is gated: accept its licence on "
        f"https://huggingface.co/{hub_id} and run `huggingface-cli login` first):\n"
        f"  huggingface-cli download {hub_id} model.safetensors --local-dir weights/{model_name}\n"
        f"then copy the file here and pass `--tok.teacher_weights weights/{model_name}/model.safetensors` "
        "(Meta's original .pth checkpoint works too), or copy the whole HF cache folder to this machine.\n"
        f"If DINOv3 access is pending, DINOv2 ViT-L/14 is not gated: `--tok.teacher dinov2` "
        f"with the weights of timm/{TEACHERS['dinov2']} (the paper finds DINOv2 the better teacher "
        "at 16 latent channels, DINOv3 at 128). "
        "For a smoke test without semantics, `--tok.teacher_weights random`."
    )


def _patch_size(model_name: str) -> int:
    match = re.search(r"patch(\d+)", model_name)
    if match is None:
        raise ValueError(
            f"cannot tell the patch size of teacher {model_name!r} (expected 'patchNN' in the name)"
        )
    return int(match.group(1))


class Teacher(nn.Module):
    """Frozen timm ViT teacher: images [B, 3, S, S] in [-1, 1] -> patch features [B, (S/16)^2, D] fp32.

    name: "dinov3", "dinov2" or a timm model name. weights: a file path, "random" (explicit
    request only; warns), or None (HF hub / torch hub cache, offline; FileNotFoundError if
    absent). image_size / token_patch: the tokenizer's input size and patch, which fix the
    feature grid (S / token_patch per side). resize_to: the size of the release's processor
    round trip (224). model_kwargs: extra timm.create_model arguments (used by tiny()).
    device: where to build (a random teacher can be built on "meta" for shape checks).
    warn_random: warn loudly about random weights (tiny() turns it off: random is its purpose).
    """

    def __init__(
        self,
        name: str = "dinov3",
        weights: str | os.PathLike | None = None,
        *,
        image_size: int = 256,
        token_patch: int = 16,
        resize_to: int = 224,
        model_kwargs: dict | None = None,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        warn_random: bool = True,
    ) -> None:
        super().__init__()
        if image_size % token_patch:
            raise ValueError(
                f"image_size {image_size} must be a multiple of the tokenizer patch {token_patch}"
            )
        self.model_name = resolve_model_name(name)
        self.grid = image_size // token_patch
        self.teacher_patch = _patch_size(self.model_name.split(".")[0])
        self.feed_size = self.grid * self.teacher_patch  # 256 for DINOv3/16, 224 for DINOv2/14
        self.image_size, self.resize_to = image_size, resize_to
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
            if weights is None:
                cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
                weights = find_cached_weights(self.model_name, cache)
                if weights is None:
                    raise FileNotFoundError(missing_weights_message(self.model_name, cache))
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"teacher weights not found: {path} (pass a .safetensors or .pth file, 'random', or "
                    "nothing to use the HF hub cache)"
                )
            try:
                # timm's own loader: strict, weights_only=True for .pth, and its checkpoint filter
                # converts Meta's original DINOv2/DINOv3 layouts and resamples position embeddings.
                self.model = timm.create_model(
                    self.model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
                )
            except RuntimeError as err:
                raise ValueError(f"{path} does not hold weights of {self.model_name}: {err}") from err
            self.is_random, self.weights_source = False, str(path)
            if device is not None:
                self.model.to(device)
            log.info("teacher %s loaded from %s", self.model_name, path)

        patch = self.model.patch_embed.patch_size
        if tuple(patch) != (self.teacher_patch, self.teacher_patch):
            raise ValueError(f"{self.model_name} has patch {patch}, expected {self.teacher_patch}")
        self.num_prefix_tokens = self.model.num_prefix_tokens  # class + register tokens (5 for DINOv3)
        self.feature_dim = self.model.num_features
        where = self.model.patch_embed.proj.weight.device
        self.register_buffer(
            "mean", torch.tensor(IMAGENET_MEAN, device=where).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(IMAGENET_STD, device=where).view(1, 3, 1, 1), persistent=False
        )
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
            model_kwargs=dict(embed_dim=dim, depth=depth, num_heads=heads),
            warn_random=False,
        )

    def train(self, mode: bool = True) -> Teacher:
        # Frozen teacher: stays in eval mode even when a parent module calls .train().
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> the normalised [B, 3, F, F] teacher input (F = feed_size)."""
        x = (images.float() + 1.0) * 0.5
        x = F.interpolate(
            x, size=(self.resize_to, self.resize_to), mode="bilinear", antialias=True, align_corners=False
        )
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(self.feed_size, self.feed_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [-1, 1] -> patch features [B, grid^2, D] (float32, no grad)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"teacher expects {self.image_size}px images, got {tuple(images.shape[-2:])}")
        tokens = self.model.forward_features(
            self.preprocess(images)
        )  # [B, prefix + grid^2, D], after final norm
        feats = tokens[:, self.num_prefix_tokens :]
        assert feats.shape[1] == self.grid * self.grid, (feats.shape, self.grid)
        return feats.float()
