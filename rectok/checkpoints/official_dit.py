"""DiT^DH checkpoints in the official layout (models/DDT.py of github.com/Shi-qingyu/RecTok).

Official names differ from ours in three places: the 1x1 patch embeddings are Conv2d
weights [D, C, 1, 1] (ours Linear [D, C]); trunk and head blocks share one list
`blocks.{i}` (trunk first); the label table is `y_embedder.embedding_table.weight`.
The RoPE buffers `enc_feat_rope.*` / `dec_feat_rope.*` are written on save; on load they
are optional (EMA copies hold parameters only) and, when present, fix the head dims and
must equal the tables our model derives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from rectok.models.dit import DiTDH, DiTDHConfig

# Heads of the official family by width (SPEC section 6); other widths need num_heads.
TRUNK_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
HEAD_HEADS = {2048: 16}

_REQUIRED_FOR_SIZES = (
    "s_embedder.proj.weight",
    "x_embedder.proj.weight",
    "y_embedder.embedding_table.weight",
    "pos_embed",
    "t_embedder.W",
)
_ROPE_KEYS = (
    "enc_feat_rope.freqs_cos",
    "enc_feat_rope.freqs_sin",
    "dec_feat_rope.freqs_cos",
    "dec_feat_rope.freqs_sin",
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename_to_official(name: str, depth_trunk: int) -> str:
    if m := re.match(r"^trunk_blocks\.(\d+)\.(.+)$", name):
        return f"blocks.{int(m[1])}.{m[2]}"
    if m := re.match(r"^head_blocks\.(\d+)\.(.+)$", name):
        return f"blocks.{depth_trunk + int(m[1])}.{m[2]}"
    if m := re.match(r"^([sx])_embedder\.(weight|bias)$", name):
        return f"{m[1]}_embedder.proj.{m[2]}"
    if name == "y_embedder.weight":
        return "y_embedder.embedding_table.weight"
    return name


def dit_to_official(model: DiTDH) -> dict[str, torch.Tensor]:
    """Our DiTDH as an official-layout state dict (what the release's `state_dict()` holds)."""
    depth_trunk = model.config.depth[0]
    state = {}
    for name, tensor in model.state_dict().items():
        key = _rename_to_official(name, depth_trunk)
        if key in ("s_embedder.proj.weight", "x_embedder.proj.weight"):
            tensor = tensor[:, :, None, None]  # Linear [D, C] -> Conv2d 1x1 [D, C, 1, 1]
        state[key] = tensor
    for prefix, table in (("enc_feat_rope", model.trunk_rope), ("dec_feat_rope", model.head_rope)):
        cos, sin = table.chunk(2, dim=-1)
        state[f"{prefix}.freqs_cos"], state[f"{prefix}.freqs_sin"] = cos, sin
    return state


def _pair(value: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{what} must be an int or a (trunk, head) pair, got {value}")
    return value


def _infer_heads(
    state: Mapping[str, torch.Tensor], widths: tuple[int, int], num_heads: int | tuple[int, int] | None
) -> tuple[int, int]:
    """Explicit num_heads, else the head dim of the saved RoPE buffers, else the official size table."""
    if num_heads is not None:
        return _pair(num_heads, "num_heads")
    heads = []
    for prefix, width, table in (
        ("enc_feat_rope", widths[0], TRUNK_HEADS),
        ("dec_feat_rope", widths[1], HEAD_HEADS),
    ):
        rope = state.get(f"{prefix}.freqs_cos")
        if rope is not None and rope.ndim == 2 and rope.shape[1] > 0 and width % rope.shape[1] == 0:
            heads.append(width // rope.shape[1])
        elif width in table:
            heads.append(table[width])
        else:
            raise ValueError(
                f"cannot infer the number of heads for width {width} ({prefix} buffers absent and the width "
                f"is not an official size {sorted(table)}): pass num_heads=(trunk, head)"
            )
    return heads[0], heads[1]


def infer_config(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int | tuple[int, int] | None = None,
    depth: tuple[int, int] | None = None,
) -> DiTDHConfig:
    """Every size of an official-layout DiT^DH state dict, read from tensor shapes."""
    missing = [k for k in _REQUIRED_FOR_SIZES if k not in state]
    if missing:
        raise ValueError(f"not an official DiT^DH state dict: missing keys {missing}")
    s_w, x_w = state["s_embedder.proj.weight"], state["x_embedder.proj.weight"]
    if s_w.ndim != 4 or s_w.shape[2:] != (1, 1) or x_w.ndim != 4 or x_w.shape[2:] != (1, 1):
        raise ValueError(
            f"patch embeddings must be 1x1 convs [D, C, 1, 1]; got s_embedder {tuple(s_w.shape)}, "
            f"x_embedder {tuple(x_w.shape)} (patch sizes > 1 are not supported)"
        )
    widths = (s_w.shape[0], x_w.shape[0])
    channels = s_w.shape[1]
    num_tokens = state["pos_embed"].shape[-2] if state["pos_embed"].ndim == 3 else -1
    grid = math.isqrt(max(num_tokens, 0))
    if grid * grid != num_tokens or grid == 0:
        raise ValueError(f"pos_embed {tuple(state['pos_embed'].shape)} is not [1, grid*grid, width]")

    block_ids = sorted({int(m[1]) for k in state if (m := _BLOCK.match(k))})
    if block_ids != list(range(len(block_ids))) or not block_ids:
        raise ValueError(f"block indices must run 0..n-1, found {block_ids}")
    if depth is not None:
        depth = _pair(depth, "depth")
        if sum(depth) != len(block_ids):
            raise ValueError(
                f"depth {depth} does not add up to the {len(block_ids)} blocks in the checkpoint"
            )
    elif widths[0] == widths[1]:
        raise ValueError(
            f"trunk and head widths are both {widths[0]}, so the split of the {len(block_ids)} blocks "
            "cannot be read from shapes: pass depth=(trunk, head)"
        )
    else:
        norm = [state.get(f"blocks.{i}.norm1.weight") for i in block_ids]
        n_trunk = sum(1 for w in norm if w is not None and w.shape == (widths[0],))
        depth = (n_trunk, len(block_ids) - n_trunk)

    fourier_dim = state["t_embedder.W"].shape[0]
    return DiTDHConfig(
        in_channels=channels,
        grid_size=grid,
        hidden_size=widths,
        depth=depth,
        num_heads=_infer_heads(state, widths, num_heads),
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        fourier_dim=fourier_dim,
    )


def dit_from_official(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int | tuple[int, int] | None = None,
    depth: tuple[int, int] | None = None,
) -> DiTDH:
    """A DiTDH (eval mode, float32 on CPU) built from and filled with an official-layout state dict.

    Sizes come from tensor shapes; heads from `num_heads`, else the saved RoPE buffers,
    else the official size table. Missing, unexpected or mis-shaped entries raise a
    ValueError naming them. `depth` is needed only when trunk and head widths are equal.
    """
    config = infer_config(state, num_heads=num_heads, depth=depth)
    model = DiTDH(config)
    expected = dit_to_official(model)
    present = set(state)
    missing = sorted(set(expected) - present - set(_ROPE_KEYS))
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"official DiT^DH checkpoint does not match the inferred config {config}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"official DiT^DH checkpoint has wrong shapes for the inferred config {config}: {wrong}"
        )
    for key in _ROPE_KEYS:
        if key in state and not torch.allclose(state[key].float(), expected[key], rtol=0, atol=1e-5):
            raise ValueError(
                f"{key} differs from the EVA 2-D RoPE table this implementation derives "
                f"(head dims {config.hidden_size[0] // config.num_heads[0]}, "
                f"{config.hidden_size[1] // config.num_heads[1]}): not a supported DiT^DH checkpoint"
            )

    ours = {}
    inverse = {_rename_to_official(name, config.depth[0]): name for name in model.state_dict()}
    for key, name in inverse.items():
        tensor = state[key]
        if key in ("s_embedder.proj.weight", "x_embedder.proj.weight"):
            tensor = tensor.flatten(1)  # Conv2d 1x1 [D, C, 1, 1] -> Linear [D, C]
        ours[name] = tensor
    model.load_state_dict(ours, strict=True)
    return model.eval()
