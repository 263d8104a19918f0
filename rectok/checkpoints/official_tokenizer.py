"""Tokenizer checkpoints in the official RecTok layout (models/rectok.py of the release).

Official names: `encoder.*` (patch_embed.0, positional_embedding, ln_pre, transformer.i,
ln_post, latent_head), `decoder.*` (decoder_embed, mask_token, positional_embedding,
ln_pre, transformer.i, ln_post, ffn.1, conv_out) and `sem_decoders.<teacher>.*`
(token_embedding, mask_embedding, positional_embedding, ln_pre, transformer.i, ln_post,
out). The frozen teacher (`sem_foundation_models.*`) is not part of the tokenizer.
Sizes are read off the tensor shapes; head counts come from the official size table.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from rectok.models.layers import mlp_hidden_dim
from rectok.models.tokenizer import VIT_SIZES, RecTok, RecTokConfig

log = logging.getLogger(__name__)

HEADS_BY_WIDTH = {width: heads for width, _, heads in VIT_SIZES.values()} | {1280: 16}
TEACHER_PREFIX = "sem_foundation_models."
SEM_PREFIX = "sem_decoders."

# (our prefix, official prefix) per submodule; blocks share inner names (norm1, attn.qkv, ...).
_COMMON = [("norm_pre.", "ln_pre."), ("blocks.", "transformer."), ("norm_post.", "ln_post.")]
_ENCODER = [
    ("patch_embed.", "patch_embed.0."),
    ("pos_embed", "positional_embedding"),
    ("latent_head.", "latent_head."),
]
_PIXEL = [
    ("embed.", "decoder_embed."),
    ("mask_token", "mask_token"),
    ("pos_embed", "positional_embedding"),
    ("to_pixels.", "ffn.1."),
    ("conv_out.", "conv_out."),
]
_SEMANTIC = [
    ("embed.", "token_embedding."),
    ("mask_token", "mask_embedding"),
    ("pos_embed", "positional_embedding"),
    ("head.", "out."),
]


def _tables(teacher: str) -> list[tuple[str, str]]:
    """Full-name prefix pairs (ours, official) for every submodule."""
    pairs = []
    for ours, theirs, inner in (
        ("encoder.", "encoder.", _ENCODER),
        ("pixel_decoder.", "decoder.", _PIXEL),
        ("semantic_decoder.", f"{SEM_PREFIX}{teacher}.", _SEMANTIC),
    ):
        pairs += [(ours + a, theirs + b) for a, b in inner + _COMMON]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def official_name(key: str, teacher: str = "dinov3") -> str:
    """The official name of one of our tokenizer state-dict keys, e.g. pixel_decoder.embed.weight ->
    decoder.decoder_embed.weight."""
    name = _rename(key, _tables(teacher))
    if name is None:
        raise KeyError(f"no official name for {key}")
    return name


def tokenizer_to_official(model: RecTok) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the official layout (loadable by the official RecTok class)."""
    return {official_name(k, model.cfg.teacher): v for k, v in model.state_dict().items()}


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer\.(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"{prefix}transformer blocks are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"checkpoint is missing {key!r}; is this an official RecTok tokenizer state dict?")
    return state[key]


def _heads(width: int, given: int | None, what: str) -> int:
    if given is not None:
        return given
    if width not in HEADS_BY_WIDTH:
        raise ValueError(
            f"{what} width {width} is not in the official size table {sorted(HEADS_BY_WIDTH)}; "
            "pass its head count"
        )
    return HEADS_BY_WIDTH[width]


def infer_config(
    state: dict[str, torch.Tensor], *, num_heads: int | None = None, semantic_num_heads: int | None = None
) -> RecTokConfig:
    """A RecTokConfig whose shapes fit an official-layout tokenizer state dict."""
    pos = _get(state, "encoder.positional_embedding")  # (1, L, W)
    patch = _get(state, "encoder.patch_embed.0.weight")  # (W, 3, p, p)
    grid = math.isqrt(pos.shape[1])
    if pos.ndim != 3 or grid * grid != pos.shape[1]:
        raise ValueError(
            f"encoder.positional_embedding {tuple(pos.shape)} is not [1, grid^2, width] "
            "(checkpoints with a class token are not supported)"
        )
    fields: dict = dict(
        img_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        token_channels=_get(state, "encoder.latent_head.weight").shape[0] // 2,
    )
    for part, prefix in (("encoder", "encoder."), ("decoder", "decoder.")):
        width = _get(state, prefix + "positional_embedding").shape[-1]
        fields |= {
            f"{part}_width": width,
            f"{part}_depth": _depth(state, prefix),
            f"{part}_heads": _heads(width, num_heads, part),
        }
    sem_names = sorted({k.split(".")[1] for k in state if k.startswith(SEM_PREFIX)})
    if len(sem_names) > 1:
        raise ValueError(f"checkpoint holds several semantic decoders {sem_names}; only one is supported")
    if sem_names:
        prefix = f"{SEM_PREFIX}{sem_names[0]}."
        width = _get(state, prefix + "positional_embedding").shape[-1]
        fields |= dict(
            teacher=sem_names[0],
            semantic_width=width,
            semantic_depth=_depth(state, prefix),
            semantic_heads=_heads(width, semantic_num_heads, "semantic decoder"),
            semantic_dim=_get(state, prefix + "out.weight").shape[0],
        )
    else:
        fields["semantic_dim"] = 0
    return RecTokConfig(**fields)


def tokenizer_from_official(
    state: dict[str, torch.Tensor], *, num_heads: int | None = None, semantic_num_heads: int | None = None
) -> RecTok:
    """Build a RecTok from an official-layout state dict (sizes inferred) and fill it exactly."""
    teacher_keys = [k for k in state if k.startswith(TEACHER_PREFIX)]
    if teacher_keys:
        log.info("skipping %d frozen-teacher tensors (%s*)", len(teacher_keys), TEACHER_PREFIX)
    state = {k: v for k, v in state.items() if not k.startswith(TEACHER_PREFIX)}
    cfg = infer_config(state, num_heads=num_heads, semantic_num_heads=semantic_num_heads)
    for prefix, width in (("encoder.", cfg.encoder_width), ("decoder.", cfg.decoder_width)):
        w3 = state.get(prefix + "transformer.0.mlp.w3.weight")
        if w3 is not None and w3.shape[1] != mlp_hidden_dim(width):
            raise ValueError(
                f"{prefix}transformer.0.mlp.w3.weight has hidden width {w3.shape[1]}, "
                f"expected int(2/3 * 4 * {width}) = {mlp_hidden_dim(width)}"
            )
    model = RecTok(cfg)
    expected = tokenizer_to_official(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "official tokenizer checkpoint does not fit: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise ValueError(
                f"{key}: checkpoint shape {tuple(state[key].shape)}, model expects {tuple(ref.shape)}"
            )
    pairs = [(b, a) for a, b in _tables(cfg.teacher)]
    ours = {_rename(k, pairs): v for k, v in state.items()}
    model.load_state_dict(ours, strict=True)
    return model
