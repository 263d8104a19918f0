"""The RecTok tokenizer: ViT encoder -> diagonal Gaussian latent -> ViT pixel decoder,
plus the small semantic decoder that is distilled from a frozen teacher (SPEC section 2).

Tokens are row-major over the patch grid (index = row * grid + col). Images are
[B, 3, H, W] in [-1, 1]; latents are [B, L, C].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rectok.models import flow
from rectok.models.layers import Block, RMSNorm, mlp_hidden_dim, run_block

# Official size table (width -> heads) for the ViT parts; see SPEC section 2.
VIT_SIZES = {
    "tiny": (192, 3, 4),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xl": (1152, 28, 16),
}


@dataclass(frozen=True)
class RecTokConfig:
    img_size: int = 256
    patch_size: int = 16
    token_channels: int = 128  # C, latent channels per token
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    semantic_width: int = 192
    semantic_depth: int = 3
    semantic_heads: int = 4
    semantic_dim: int = 1024  # teacher feature width; 0 builds no semantic decoder (inference only)
    teacher: str = "dinov3"  # name of the semantic head in official checkpoints
    noise_schedule: str = "shift"  # "shift" | "uniform" | "lognorm"
    timestep_shift: float | None = None  # None: sqrt(grid_h * grid_w * C / 4096)
    gamma: float = 1.0  # scale of the forward-flow noise; 0 disables the flow
    # The semantic decoder reads z_t along the flow (FSD); False: the clean posterior sample z (x0),
    # the paper's "w/o FSD" ablation. The pixel decoder reads z_t either way.
    semantic_flow: bool = True
    mask_ratio_min: float = -0.1
    mask_ratio_max: float = 0.4

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.token_channels < 1:
            raise ValueError(f"token_channels must be positive, got {self.token_channels}")
        for part in ("encoder", "decoder", "semantic"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if part == "semantic" and self.semantic_dim == 0:
                continue
            # 2-D RoPE splits each head into row/column halves of interleaved pairs.
            if width % heads or (width // heads) % 4:
                raise ValueError(f"{part}: width {width} / {heads} heads must give a head dim divisible by 4")
        if self.noise_schedule not in flow.SCHEDULES:
            raise ValueError(
                f"unknown noise_schedule {self.noise_schedule!r}; choose one of {flow.SCHEDULES}"
            )
        if not self.mask_ratio_max < 1.0:
            raise ValueError(f"mask_ratio_max must be below 1, got {self.mask_ratio_max}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    @property
    def shift(self) -> float:
        if self.timestep_shift is not None:
            return self.timestep_shift
        return flow.timestep_shift(self.grid_size, self.grid_size, self.token_channels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RecTokConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown RecTokConfig fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, RecTokConfig] = {
    # Official: ViT-B/16 encoder and pixel decoder at 256 px, tiny semantic head, DINOv3-L teacher.
    "rectok-B": RecTokConfig(),
    # CPU-sized model with the layout of the official test fixtures (meta.json "tokenizer_tiny").
    "rectok-tiny": RecTokConfig(
        img_size=64,
        token_channels=16,
        encoder_width=192,
        encoder_depth=3,
        encoder_heads=4,
        decoder_width=192,
        decoder_depth=3,
        decoder_heads=4,
        semantic_dim=64,
    ),
}


def tokenizer_config(name: str = "rectok-B", **overrides) -> RecTokConfig:
    """Preset `name` with fields replaced by `overrides` (e.g. token_channels=32)."""
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def tokenizer_rope_table(grid: int | tuple[int, int], head_dim: int, device=None) -> torch.Tensor:
    """2-D RoPE table [L, 2 * head_dim] = [cos | sin] of the official tokenizer.

    Row angles fill channels [0, D/2), column angles [D/2, D). Frequencies repeat as
    cat([f, f]), so the interleaved pairs that rotate_half mixes carry different
    frequencies: not an exact rotation, but what released checkpoints were trained with.
    Computed in float32 in the official order so the table matches bit for bit.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    f = 7.0 * (7.0 / 7e-4) ** torch.linspace(0, -1, head_dim // 4, device=device, dtype=torch.float32)
    f2 = torch.cat([f, f]) * 2 * math.pi  # (D/2,) angular frequencies
    rows = torch.linspace(0, 1, gh, device=device, dtype=torch.float32)
    cols = torch.linspace(0, 1, gw, device=device, dtype=torch.float32)
    angle_rows = (rows[:, None] * f2).repeat_interleave(gw, dim=0)  # (L, D/2), token = row * gw + col
    angle_cols = (cols[:, None] * f2).repeat(gh, 1)  # (L, D/2)
    angle = torch.cat([angle_rows, angle_cols], dim=-1)  # (L, D)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


def insert_mask_tokens(h: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible tokens h [B, L_keep, W] (in ids_shuffle order) -> full grid [B, L, W].

    Mask tokens are appended after the visible ones and the sequence is unshuffled
    with ids_restore [B, L] (MAE convention).
    """
    B, L_keep, W = h.shape
    L = ids_restore.shape[1]
    if ids_restore.shape[0] != B or L < L_keep:
        raise ValueError(
            f"ids_restore {tuple(ids_restore.shape)} does not fit {L_keep} visible tokens of batch {B}"
        )
    full = torch.cat([h, mask_token.to(h.dtype).expand(B, L - L_keep, W)], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, W))


class _Trunk(nn.Module):
    """RMSNorm -> RoPE blocks -> RMSNorm over a full or gathered token sequence."""

    def __init__(self, width: int, depth: int, heads: int, grid: int) -> None:
        super().__init__()
        self.norm_pre = RMSNorm(width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_hidden_dim(width)) for _ in range(depth)])
        self.norm_post = RMSNorm(width)
        self.register_buffer("rope_table", tokenizer_rope_table(grid, width // heads), persistent=False)
        self.activation_checkpointing = False  # set_activation_checkpointing

    def run(self, h: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = self.norm_pre(h)
        for block in self.blocks:
            h = run_block(block, self.activation_checkpointing, h, rope)
        return self.norm_post(h)


class Encoder(_Trunk):
    def __init__(self, cfg: RecTokConfig) -> None:
        W = cfg.encoder_width
        super().__init__(W, cfg.encoder_depth, cfg.encoder_heads, cfg.grid_size)
        self.img_size, self.patch_size = cfg.img_size, cfg.patch_size
        self.patch_embed = nn.Conv2d(3, W, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, W))
        self.latent_head = nn.Linear(W, 2 * cfg.token_channels)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1], ids_keep [B, L_keep] int64 or None -> moments [B, L_keep, 2C].

        Moments are (mean, log-variance) before clamping; DiagonalGaussian clamps.
        """
        if x.shape[1:] != (3, self.img_size, self.img_size):
            raise ValueError(
                f"encoder expects [B, 3, {self.img_size}, {self.img_size}] images, got {tuple(x.shape)}"
            )
        # (B, L, W), tokens row-major. Contiguous: the transposed view would keep its layout through
        # the position add and every block, and each Linear would copy it before its matmul
        # (training's masking gather makes it contiguous anyway; inference did not).
        h = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed
        rope = self.rope_table
        if ids_keep is not None:
            if ids_keep.ndim != 2 or ids_keep.shape[0] != x.shape[0]:
                raise ValueError(
                    f"ids_keep must be [B, L_keep] for batch {x.shape[0]}, got {tuple(ids_keep.shape)}"
                )
            h = torch.gather(h, 1, ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, L_keep, W)
            rope = rope[ids_keep]  # (B, L_keep, 2D): each kept token keeps its grid position
        return self.latent_head(self.run(h, rope))


class PixelDecoder(_Trunk):
    def __init__(self, cfg: RecTokConfig) -> None:
        W = cfg.decoder_width
        super().__init__(W, cfg.decoder_depth, cfg.decoder_heads, cfg.grid_size)
        self.grid, self.patch_size = cfg.grid_size, cfg.patch_size
        self.embed = nn.Linear(cfg.token_channels, W)
        self.mask_token = nn.Parameter(torch.empty(1, 1, W))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, W))
        self.to_pixels = nn.Conv2d(W, cfg.patch_size**2 * 3, 1)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, L or L_keep, C], ids_restore [B, L] or None -> images [B, 3, H, W] in [-1, 1], unclamped."""
        h = self.embed(z)
        if ids_restore is not None:
            h = insert_mask_tokens(h, self.mask_token, ids_restore)
        L = h.shape[1]
        if L != self.grid**2:
            raise ValueError(f"pixel decoder expects {self.grid**2} tokens (or ids_restore), got {L}")
        h = self.run(h + self.pos_embed, self.rope_table)
        g, p = self.grid, self.patch_size
        # to_pixels is a 1x1 convolution (the release's layout), run as the Linear it equals on the
        # tokens: the same numbers (bit for bit in the forward), without the two layout copies
        # around oneDNN's convolution (-40% for this layer on a CPU).
        h = F.linear(h, self.to_pixels.weight.flatten(1), self.to_pixels.bias)  # (B, L, p*p*3)
        # Each token's p*p*3 channels are its patch, ordered (p1, p2, c) as in the release. The image
        # is assembled channels-last ([B, H, W, 3] in memory, viewed as [B, 3, H, W]): oneDNN's 3x3
        # convolution on 3 channels is up to 5x faster there than on NCHW, forward and backward
        # (same outputs bit for bit in the forward); the result is returned contiguous.
        img = rearrange(h, "b (gh gw) (p1 p2 c) -> b (gh p1) (gw p2) c", gh=g, p1=p, p2=p)
        return self.conv_out(img.permute(0, 3, 1, 2)).contiguous()


class SemanticDecoder(_Trunk):
    """Small ViT head predicting teacher features from the noisy latent (FSD on visible, RAD on masked)."""

    def __init__(self, cfg: RecTokConfig) -> None:
        W = cfg.semantic_width
        super().__init__(W, cfg.semantic_depth, cfg.semantic_heads, cfg.grid_size)
        self.seq_len = cfg.seq_len
        self.embed = nn.Linear(cfg.token_channels, W)
        self.mask_token = nn.Parameter(torch.empty(1, 1, W))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, W))
        self.head = nn.Linear(W, cfg.semantic_dim)

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, L or L_keep, C], ids_restore [B, L] or None -> features [B, L, D_teacher]."""
        h = self.embed(z)
        if ids_restore is not None:
            h = insert_mask_tokens(h, self.mask_token, ids_restore)
        if h.shape[1] != self.seq_len:
            raise ValueError(
                f"semantic decoder expects {self.seq_len} tokens (or ids_restore), got {h.shape[1]}"
            )
        return self.head(self.run(h + self.pos_embed, self.rope_table))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per token and channel from moments [..., 2C]."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=-1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over all but the batch dim -> [B]."""
        kl = 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


@dataclass
class TokenizerOutput:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], unclamped
    posterior: DiagonalGaussian  # over the visible tokens
    semantic: torch.Tensor | None  # (B, L, D_teacher) or None
    mask: flow.MaskIds | None
    tau: torch.Tensor | None  # (B,) noise level of the forward flow, None when no flow ran


class RecTok(nn.Module):
    def __init__(self, cfg: RecTokConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg)
        self.semantic_decoder = SemanticDecoder(cfg) if cfg.semantic_dim > 0 else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: trunc_normal(0.02) / zero bias for encoder and pixel decoder Linear/Conv,
        width^-0.5 * randn position embeddings and pixel mask token, PyTorch defaults for the
        semantic decoder's layers with a zero mask embedding."""
        for part in (self.encoder, self.pixel_decoder):
            for m in part.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
        for emb in (self.encoder.pos_embed, self.pixel_decoder.pos_embed, self.pixel_decoder.mask_token):
            nn.init.normal_(emb, std=emb.shape[-1] ** -0.5)
        sem = self.semantic_decoder
        if sem is not None:
            for m in sem.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
            nn.init.normal_(sem.pos_embed, std=sem.pos_embed.shape[-1] ** -0.5)
            nn.init.zeros_(sem.mask_token)

    def encode(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> DiagonalGaussian:
        """x [B, 3, H, W] in [-1, 1] -> posterior over [B, L_keep, C]."""
        return DiagonalGaussian(self.encoder(x, ids_keep))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B, L, C] -> images [B, 3, H, W] in [0, 1], float32 (also under autocast)."""
        return torch.clamp(self.pixel_decoder(z).float() * 0.5 + 0.5, 0.0, 1.0)

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic round trip through the posterior mean; images in [0, 1]."""
        return self.decode(self.encode(x).mean)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, draws: flow.FlowDraws | None = None
    ) -> TokenizerOutput:
        """Training step forward (official semantics) in train mode; plain autoencoding in eval mode.

        Train: random MAE masking, posterior sample of the visible tokens, forward flow
        z_t = (1 - tau) z + tau * gamma * eps, both decoders on z_t (the semantic decoder on z when
        cfg.semantic_flow is False). Eval: no masking,
        posterior mean, no noise, no semantic prediction. `draws` replaces every random draw of
        the train-mode forward (then `generator` is unused).
        """
        cfg = self.cfg
        if not self.training:
            post = self.encode(x)
            return TokenizerOutput(self.pixel_decoder(post.mean), post, None, None, None)
        B, device = x.shape[0], x.device
        if draws is None:
            ratio = flow.sample_mask_ratio(generator, cfg.mask_ratio_min, cfg.mask_ratio_max)
            mask = flow.random_masking_ids(B, cfg.seq_len, ratio, generator, device=device)
        else:
            mask = flow.masking_from_shuffle(draws.ids_shuffle.to(device), draws.mask_ratio)
        post = self.encode(x, mask.ids_keep)
        z = post.sample(generator, noise=None if draws is None else draws.posterior_noise.to(post.mean))
        tau, z_clean = None, z
        if cfg.gamma > 0:
            if draws is None:
                tau = flow.sample_tau(B, cfg.shift, cfg.noise_schedule, generator, device=device)
                eps = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
            else:
                tau, eps = draws.tau.to(device), draws.eps.to(z)
            z = flow.forward_flow(z, eps * cfg.gamma, tau)
        sem = None
        if self.semantic_decoder is not None:
            sem = self.semantic_decoder(z if cfg.semantic_flow else z_clean, mask.ids_restore)
        return TokenizerOutput(self.pixel_decoder(z, mask.ids_restore), post, sem, mask, tau)
