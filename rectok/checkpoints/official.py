"""Load and save checkpoints in the official RecTok layout (github.com/Shi-qingyu/RecTok).

`src` may be a state dict, a .safetensors file or an official .pth checkpoint (its
"model_ema" entry when present, else "model"); .pth files are always read with
weights_only=True. The tokenizer- and DiT^DH-specific key mappings live in
official_tokenizer.py and official_dit.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rectok.checkpoints.store import atomic_write

log = logging.getLogger(__name__)

StateSource = Mapping[str, torch.Tensor] | str | os.PathLike


def read_state_dict(src: StateSource) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a state dict, a .safetensors file or an official .pth."""
    if isinstance(src, Mapping):
        state = dict(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # unpickling refused or corrupt file
                raise ValueError(
                    f"{path} is not a loadable checkpoint (read with weights_only=True): {err}"
                ) from err
            if not isinstance(obj, Mapping):
                raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
            for key in ("model_ema", "model"):
                if key in obj and isinstance(obj[key], Mapping):
                    log.info("reading %r from %s", key, path)
                    obj = obj[key]
                    break
            state = dict(obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries are not tensors: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return state


def load_official_tokenizer(
    src: StateSource, *, num_heads: int | None = None, semantic_num_heads: int | None = None
):
    """A RecTok tokenizer built and filled from an official-layout checkpoint (sizes inferred)."""
    from .official_tokenizer import tokenizer_from_official

    return tokenizer_from_official(
        read_state_dict(src), num_heads=num_heads, semantic_num_heads=semantic_num_heads
    )


def load_official_dit(
    src: StateSource,
    *,
    num_heads: int | tuple[int, int] | None = None,
    depth: tuple[int, int] | None = None,
):
    """A DiT^DH built and filled from an official-layout checkpoint (sizes inferred).

    `depth` = (trunk, head) is needed only when both widths are equal (the split is then
    not visible in the tensor shapes).
    """
    from .official_dit import dit_from_official

    return dit_from_official(read_state_dict(src), num_heads=num_heads, depth=depth)


def save_official(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model` in the official layout (.safetensors, or .pth as {"model": state})."""
    from rectok.models.dit import DiTDH
    from rectok.models.tokenizer import RecTok

    from .official_dit import dit_to_official
    from .official_tokenizer import tokenizer_to_official

    if isinstance(model, RecTok):
        state = tokenizer_to_official(model)
    elif isinstance(model, DiTDH):
        state = dit_to_official(model)
    else:
        raise TypeError(f"save_official expects a RecTok or DiTDH model, got {type(model).__name__}")
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save({"model": state}, f))
