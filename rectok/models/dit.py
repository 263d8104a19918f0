"""DiT^DH: a diffusion transformer with a wide, shallow head (SPEC section 6).

Latents [B, C, h, w] become h*w tokens (row-major). The trunk ("s-path") embeds them
with a 1x1 projection plus a fixed 2-D sin-cos position embedding and runs adaLN blocks
conditioned per sample on c = silu(t_emb + y_emb). Its output, s = silu(t_emb + s),
projected to the head width, conditions every head block ("x-path") and the final layer
per token. The head re-embeds the raw latents with its own 1x1 projection. Time runs
from t = 0 (noise) to t = 1 (data); the network predicts the velocity data - noise.

State-dict names follow the official release where that costs nothing (official_dit.py
maps the rest: 1x1 convs stored as Linear, one block list split into trunk and head).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rectok import kernels
from rectok.models.layers import Attention, RMSNorm, SwiGLUMLP, run_block


@dataclass(frozen=True)
class DiTDHConfig:
    in_channels: int = 128  # latent channels C
    grid_size: int = 16  # latent grid h = w (256 px / tokenizer patch 16)
    hidden_size: tuple[int, int] = (1152, 2048)  # (trunk, head) widths
    depth: tuple[int, int] = (28, 2)
    num_heads: tuple[int, int] = (16, 16)
    num_classes: int = 1000  # the label table has one more row: the null class
    mlp_ratio: float = 4.0
    label_dropout: float = 0.1  # training only: labels replaced by the null class
    fourier_dim: int = 256  # Gaussian-Fourier frequencies of the time embedding
    fourier_scale: float = 1.0  # their standard deviation

    def __post_init__(self) -> None:
        for name in ("hidden_size", "depth", "num_heads"):
            value = tuple(getattr(self, name))
            if len(value) != 2:
                raise ValueError(f"DiTDHConfig.{name} must be a (trunk, head) pair, got {value}")
            object.__setattr__(self, name, value)
        for width, heads in zip(self.hidden_size, self.num_heads):
            if width % heads or (width // heads) % 4:
                raise ValueError(
                    f"width {width} with {heads} heads: the head dim must be a multiple of 4 for 2-D RoPE"
                )
        if self.hidden_size[0] % 4:
            raise ValueError(f"trunk width {self.hidden_size[0]} must be a multiple of 4 (2-D sin-cos)")

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def mlp_hidden(self, width: int) -> int:
        # The release computes int(2/3 * int(width * mlp_ratio)): 3072 at 1152, 5461 at 2048.
        return int(2 / 3 * int(width * self.mlp_ratio))


DIT_DH_PRESETS: dict[str, DiTDHConfig] = {
    # CPU-sized member; the same sizes as the official fixture dit_dh_tiny.
    "dit-dh-tiny": DiTDHConfig(
        grid_size=8, hidden_size=(128, 192), depth=(2, 1), num_heads=(2, 3), num_classes=10
    ),
    "dit-dh-s": DiTDHConfig(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16)),
    "dit-dh-b": DiTDHConfig(hidden_size=(768, 2048), depth=(12, 2), num_heads=(12, 16)),
    "dit-dh-l": DiTDHConfig(hidden_size=(1024, 2048), depth=(24, 2), num_heads=(16, 16)),
    "dit-dh-xl": DiTDHConfig(hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16)),
}


def dit_config(name: str, **overrides) -> DiTDHConfig:
    """A preset by name ("dit-dh-tiny", "-s", "-b", "-l", "-xl"), with field overrides."""
    if name not in DIT_DH_PRESETS:
        raise ValueError(f"unknown DiT^DH preset {name!r}; choose one of {', '.join(DIT_DH_PRESETS)}")
    return replace(DIT_DH_PRESETS[name], **overrides)


def sincos_pos_embed_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed MAE-style position embedding [grid*grid, width], computed in float64.

    As in the release, the first half encodes the column and the second the row, each as
    [sin(pos * w) | cos(pos * w)] with w = 1 / 10000 ** (arange(width/4) / (width/4)).
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = pos.repeat_interleave(grid), pos.repeat(grid)  # token index = row * grid + col

    def enc(p: torch.Tensor) -> torch.Tensor:
        angle = p[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([enc(col), enc(row)], dim=1).float()


def eva_rope_table(head_dim: int, grid: int) -> torch.Tensor:
    """2-D RoPE table [grid*grid, 2*head_dim] = [cos | sin] of the EVA variant used by DiT^DH.

    Per axis d = head_dim / 2 channels with frequencies 1 / 10000 ** (arange(0, d, 2) / d),
    each repeated for an interleaved channel pair (a true rotation); rows take the first
    half of the head dim, columns the second. Float32 throughout, in the release's order
    of operations, so the table is bit-identical to the official buffers.
    """
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    pos = torch.arange(grid) / grid * grid  # the release's (ft_seq_len / pt_seq_len) rescaling
    angle = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, d)
    angle = torch.cat(
        [angle[:, None, :].expand(grid, grid, d), angle[None, :, :].expand(grid, grid, d)], dim=-1
    ).reshape(grid * grid, head_dim)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


class GaussianFourierEmbedding(nn.Module):
    """t [B] -> MLP([sin(2 pi t W), cos(2 pi t W)]) [B, width] with fixed random W ~ N(0, scale^2)."""

    def __init__(self, width: int, num_freqs: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        # Drawn once here (not in initialize_weights) and saved with the model: never trained.
        self.register_buffer("W", torch.randn(num_freqs) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Same operation order as the release (t * W * 2 * pi) for bit-level parity.
        angle = t.float()[:, None] * self.W.float()[None, :] * 2 * math.pi  # (B, F)
        features = torch.cat([angle.sin(), angle.cos()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # a no-op unless the model was cast


class AdaLNBlock(nn.Module):
    """Pre-norm block with adaLN: x += gate * f(rms_norm(x) * (1 + scale) + shift) for attention and MLP."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLUMLP(width, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope_table: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; cond [B, D] (per sample) or [B, L, D] (per token); rope_table [L, 2*head_dim]."""
        mod = self.adaLN_modulation(cond)
        if mod.ndim == 2:
            mod = mod.unsqueeze(1)  # (B, 1, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        h = kernels.rms_norm_modulate(x, self.norm1.weight, shift_a, scale_a, self.norm1.eps)
        x = x + gate_a * self.attn(h, rope_table)
        h = kernels.rms_norm_modulate(x, self.norm2.weight, shift_m, scale_m, self.norm2.eps)
        return x + gate_m * self.mlp(h)


class FinalLayer(nn.Module):
    """Per-token adaLN (shift, scale; no gate) after RMSNorm, then Linear to the latent channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x, cond [B, L, D] -> [B, L, out_channels]."""
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(
            kernels.rms_norm_modulate(x, self.norm_final.weight, shift, scale, self.norm_final.eps)
        )


@torch.compiler.disable
def draw_label_dropout(y: torch.Tensor, p: float) -> torch.Tensor:
    """[B] bool, True with probability p: drawn in eager PyTorch even inside a compiled forward
    (Inductor's own RNG would draw other numbers, and a --compile run would not repeat an eager one)."""
    return torch.rand(y.shape, device=y.device) < p


class DiTDH(nn.Module):
    """DiT^DH velocity network: dit(x [B, C, h, w], t [B], y [B] int64) -> v [B, C, h, w]."""

    def __init__(self, config: DiTDHConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        (d_s, d_x), (n_s, n_x), (h_s, h_x) = cfg.hidden_size, cfg.depth, cfg.num_heads
        self.num_classes = cfg.num_classes
        self.label_dropout = cfg.label_dropout  # settable; only used in training mode
        self.activation_checkpointing = False  # set_activation_checkpointing

        self.s_embedder = nn.Linear(cfg.in_channels, d_s)  # the release's 1x1 conv
        self.x_embedder = nn.Linear(cfg.in_channels, d_x)
        self.t_embedder = GaussianFourierEmbedding(d_s, cfg.fourier_dim, cfg.fourier_scale)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d_s)  # last row: null class
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d_s, cfg.grid_size)[None])  # (1, L, d_s)
        # RoPE tables are derived from the config, so they are not saved.
        self.register_buffer("trunk_rope", eva_rope_table(d_s // h_s, cfg.grid_size), persistent=False)
        self.register_buffer("head_rope", eva_rope_table(d_x // h_x, cfg.grid_size), persistent=False)
        self.trunk_blocks = nn.ModuleList(AdaLNBlock(d_s, h_s, cfg.mlp_hidden(d_s)) for _ in range(n_s))
        self.s_projector = nn.Linear(d_s, d_x) if d_s != d_x else nn.Identity()
        self.head_blocks = nn.ModuleList(AdaLNBlock(d_x, h_x, cfg.mlp_hidden(d_x)) for _ in range(n_x))
        self.final_layer = FinalLayer(d_x, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's init (SPEC section 6); other Linear layers keep PyTorch's default, as there."""
        for embed in (
            self.s_embedder,
            self.x_embedder,
        ):  # Xavier as a Linear, as the release does for its conv
            nn.init.xavier_uniform_(embed.weight)
            nn.init.zeros_(embed.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN and the output projection start at zero, so every block starts as the identity
        # and the initial velocity is 0.
        for block in [*self.trunk_blocks, *self.head_blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden_size[0], self.config.grid_size)[None])

    def drop_labels(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free-guidance label dropout: in training mode each label becomes the null class
        with probability `label_dropout`; in eval mode labels pass unchanged. A given `drop` mask
        [B] bool (True: null class) is applied as it is, in either mode, and nothing is drawn."""
        if drop is None:
            drop = self.label_dropout_mask(y)
            if drop is None:
                return y
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def label_dropout_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """The mask drop_labels draws when given none: [B] bool in training mode, None in eval mode
        or at dropout 0 (nothing drawn)."""
        if not self.training or self.label_dropout <= 0:
            return None
        return draw_label_dropout(y, self.label_dropout)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, label_drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, C, h, w] noisy latent, t [B] time (1 = data, 0 = noise), y [B] int64 labels
        (num_classes = null class), label_drop [B] bool: an explicit label-dropout mask (see
        drop_labels; None draws one in training mode) -> velocity [B, C, h, w]."""
        B, C, H, W = x.shape
        if (C, H * W) != (self.config.in_channels, self.config.num_tokens) or H != W:
            raise ValueError(
                f"DiTDH expects latents [B, {self.config.in_channels}, {self.config.grid_size}, "
                f"{self.config.grid_size}], got {tuple(x.shape)}"
            )
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C), row-major
        t_emb = self.t_embedder(t.expand(B))  # (B, d_s)
        c = F.silu(t_emb + self.y_embedder(self.drop_labels(y, label_drop)))

        s = self.s_embedder(tokens) + self.pos_embed  # (B, L, d_s)
        for block in self.trunk_blocks:
            s = run_block(block, self.activation_checkpointing, s, c, self.trunk_rope)
        s = self.s_projector(F.silu(t_emb[:, None, :] + s))  # (B, L, d_x)

        h = self.x_embedder(tokens)  # (B, L, d_x)
        for block in self.head_blocks:
            h = run_block(block, self.activation_checkpointing, h, s, self.head_rope)
        out = self.final_layer(h, s)  # (B, L, C)
        return rearrange(out, "b (h w) c -> b c h w", h=H)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


class LatentNormalizer(nn.Module):
    """Per-channel latent statistics: normalize z -> (z - mean) / std, denormalize back (SPEC section 6).

    Kept apart from DiTDH so the DiT state dict maps one-to-one onto the official layout;
    the statistics belong to the tokenizer's latent space and travel with it (or with the
    generator's training checkpoint) as this module's state dict {"mean", "std"}.
    Works on channel-first latents [B, C, ...].
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(f"mean and std must both be [C]; got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("latent std must be positive in every channel")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim < 2 or z.shape[1] != self.mean.shape[0]:
            raise ValueError(f"expected latents [B, {self.mean.shape[0]}, ...], got {tuple(z.shape)}")
        view = (1, -1) + (1,) * (z.ndim - 2)
        return self.mean.view(view).to(z.dtype), self.std.view(view).to(z.dtype)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean
