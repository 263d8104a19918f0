"""Checkpoints trained at one resolution, loaded at another (USERS.md item 8).

Only the position information depends on the grid. The tokenizer's learned absolute position
embeddings [1, grid*grid, width] are resampled bicubically with timm's resample_abs_pos_embed
(what timm does when a ViT is loaded at another image size); DiT^DH's fixed 2-D sin-cos table is
regenerated for the new grid, as its definition is exact at any grid. RoPE tables are derived from
the grid: the constructors rebuild them, and a state that carries them (an EMA state holds every
buffer) gets them rebuilt here. All other tensors are returned as they are (the same objects).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from rectok.models.dit import DiTDH, eva_rope_table, sincos_pos_embed_2d
from rectok.models.tokenizer import RecTok, tokenizer_rope_table

TOKENIZER_POS_EMBEDS = ("encoder.pos_embed", "pixel_decoder.pos_embed", "semantic_decoder.pos_embed")
TOKENIZER_ROPE = ("encoder.rope_table", "pixel_decoder.rope_table", "semantic_decoder.rope_table")
DIT_ROPE = {"trunk_rope", "head_rope"}


def grid_for(img_size: int, patch_size: int) -> int:
    """The patch grid of `img_size` px images; a one-line ValueError naming valid sizes otherwise."""
    if img_size < patch_size or img_size % patch_size:
        lower = max(patch_size, img_size // patch_size * patch_size)
        raise ValueError(
            f"img_size {img_size} is not a multiple of the tokenizer's patch size {patch_size}: "
            f"pass a multiple of {patch_size}, e.g. {lower} or {lower + patch_size}"
        )
    return img_size // patch_size


def check_grid(grid_size: int) -> int:
    """A DiT^DH latent grid: a positive int (one line ValueError otherwise)."""
    if grid_size < 1:
        raise ValueError(
            f"grid_size {grid_size} must be a positive number of latent tokens per side "
            "(the tokenizer's img_size // patch_size)"
        )
    return grid_size


def _grid_tokens(tensor: torch.Tensor, grid: int, key: str) -> None:
    if tensor.ndim != 3 or tensor.shape[:2] != (1, grid * grid):
        raise ValueError(f"{key} {tuple(tensor.shape)} is not [1, {grid}*{grid}, width]")


def resample_tokenizer_state(
    state: Mapping[str, torch.Tensor], old_grid: int, new_grid: int
) -> dict[str, torch.Tensor]:
    """A tokenizer state dict (ours; any subset of the parts) for a `new_grid` x `new_grid` patch grid.

    Every learned position embedding [1, old_grid^2, W] becomes [1, new_grid^2, W] by bicubic
    resampling (timm's resample_abs_pos_embed, no prefix tokens); RoPE tables present in `state`
    are rebuilt for the new grid; all other entries are returned unchanged."""
    from timm.layers import resample_abs_pos_embed  # timm takes seconds to import: only when used

    out = dict(state)
    if new_grid == old_grid:
        return out
    for key in TOKENIZER_POS_EMBEDS:
        if key in out:
            _grid_tokens(out[key], old_grid, key)
            out[key] = resample_abs_pos_embed(
                out[key], new_size=[new_grid, new_grid], old_size=[old_grid, old_grid], num_prefix_tokens=0
            )
    for key in TOKENIZER_ROPE:
        if key in out:  # [L, 2 * head_dim]
            table = out[key]
            out[key] = tokenizer_rope_table(new_grid, table.shape[1] // 2).to(table)
    return out


def resample_dit_state(
    state: Mapping[str, torch.Tensor], old_grid: int, new_grid: int
) -> dict[str, torch.Tensor]:
    """A DiT^DH state dict (ours) for a `new_grid` x `new_grid` latent grid: `pos_embed` becomes the
    sin-cos table of the new grid (fixed, never trained, so regenerated rather than interpolated);
    RoPE tables present in `state` are rebuilt; all other entries are returned unchanged."""
    out = dict(state)
    if new_grid == old_grid:
        return out
    pos = out["pos_embed"]
    _grid_tokens(pos, old_grid, "pos_embed")
    out["pos_embed"] = sincos_pos_embed_2d(pos.shape[-1], new_grid)[None].to(pos)
    for key in DIT_ROPE & set(out):  # [L, 2 * head_dim]
        table = out[key]
        out[key] = eva_rope_table(table.shape[1] // 2, new_grid).to(table)
    return out


def resize_tokenizer(model: RecTok, img_size: int) -> RecTok:
    """A copy of `model` (built on the CPU) for `img_size` px images, position embeddings resampled,
    or `model` itself at its own size. Used for official-layout files, which are converted first."""
    cfg = model.cfg
    grid = grid_for(img_size, cfg.patch_size)
    if grid == cfg.grid_size:
        return model
    resized = RecTok(dataclasses.replace(cfg, img_size=img_size))
    resized.load_state_dict(resample_tokenizer_state(model.state_dict(), cfg.grid_size, grid), strict=True)
    return resized.train(model.training)


def resize_dit(model: DiTDH, grid_size: int) -> DiTDH:
    """A copy of `model` (built on the CPU) for a `grid_size` latent grid, sin-cos table regenerated,
    or `model` itself at its own grid."""
    cfg = model.config
    if check_grid(grid_size) == cfg.grid_size:
        return model
    resized = DiTDH(dataclasses.replace(cfg, grid_size=grid_size))
    resized.load_state_dict(resample_dit_state(model.state_dict(), cfg.grid_size, grid_size), strict=True)
    return resized.train(model.training)
