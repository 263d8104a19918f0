"""Loading models from disk: our checkpoints and exports, and official-layout files.

Used by generation (rectok.generate, sample.py), evaluation and training (a stage-2 or DiT^DH
run starts from a tokenizer checkpoint). Accepted: a training checkpoint `ckpt_*.pt` (the raw
or the EMA weights), a run folder (its latest checkpoint, else its only / EMA `.safetensors`
export), an exported `.safetensors` with its config in the metadata, and official-layout
files (through rectok.official). Latent statistics (per-channel mean / std of the tokenizer's
posterior mean) are read from the DiT^DH or tokenizer checkpoint or from a file of their own.
Any of these loads at another resolution than it was trained at (`img_size=` / `grid_size=`,
rectok.checkpoints.resolution).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rectok.checkpoints import resolution, store
from rectok.models.dit import DiTDH, DiTDHConfig, LatentNormalizer
from rectok.models.tokenizer import RecTok, RecTokConfig

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model read from disk, with where it came from (for result files)."""

    model: nn.Module
    path: Path
    layout: str  # "ours" | "official"
    config: dict | None = None  # the model config stored with our checkpoints (its size as loaded)
    latent_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the checkpoint's other entries / metadata
    # the saved img_size (tokenizer) / latent grid (DiT^DH) when loaded at another one, else None
    resampled_from: int | None = None

    @property
    def time_shift(self) -> float | None:
        """The Euler time shift the DiT^DH was trained with (our checkpoints), else None."""
        value = self.raw.get("time_shift")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def stats_fingerprint(self) -> str | None:
        """The tokenizer fingerprint the stored latent statistics belong to (a tokenizer's own, or the
        one a DiT^DH was trained on), else None."""
        stats = self.raw.get("latent_stats")
        value = stats.get("tokenizer_fingerprint") if isinstance(stats, Mapping) else None
        value = value or self.raw.get("latent_stats_fingerprint") or self.raw.get("tokenizer_fingerprint")
        return value if isinstance(value, str) and value else None

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer checkpoint a DiT^DH was trained on (our checkpoints), else None."""
        value = self.raw.get("tokenizer")
        return value if isinstance(value, str) and value else None


def tokenizer_fingerprint(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of the tokenizer's weights (bytes, in key order): what its latents
    depend on, whatever file they came from (the semantic decoder, a training-only head, is left
    out). A DiT^DH checkpoint records it so that a resume with another tokenizer is refused, latent
    statistics record it so that they are never used with another tokenizer, and it names the
    latent cache."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    state = {k: v for k, v in state.items() if not k.startswith("semantic_decoder.")}
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_path(path: str | os.PathLike, what: str, hint: str) -> Path:
    """A checkpoint file: the file itself, or for a run folder its latest ckpt_*.pt, else its only
    (or EMA) .safetensors export. FileNotFoundError with `hint` (the command that makes it)."""
    path = Path(path)
    if path.is_dir():
        found = store.latest_checkpoint(path)
        if found is not None:
            return found
        exports = sorted(path.glob("*.safetensors"))
        ema = [p for p in exports if "ema" in p.name]
        if len(exports) == 1 or len(ema) == 1:
            return (ema or exports)[0]
        if exports:
            raise FileNotFoundError(
                f"{what}: {path} holds several .safetensors files ({', '.join(p.name for p in exports)}); "
                "pass the one to use"
            )
        raise FileNotFoundError(f"{what}: no checkpoint (ckpt_*.pt or *.safetensors) in {path}. {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist. {hint}")
    return path


def _stats_from(obj: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) float32 [C] as train.py stores them: {"latent_stats": {"mean", "std"}} in a
    training checkpoint, "latent_mean" / "latent_std" in the metadata of an export."""
    if not isinstance(obj, Mapping):
        return None
    stats = obj.get("latent_stats")
    if isinstance(stats, Mapping) and "mean" in stats and "std" in stats:
        return _as_stats(stats["mean"], stats["std"])
    if "latent_mean" in obj and "latent_std" in obj:
        return _as_stats(obj["latent_mean"], obj["latent_std"])
    return None


def _as_stats(mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(-1)
    std = torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(-1)
    LatentNormalizer(mean, std)  # validates shapes and positivity
    return mean, std


def read_latent_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [C] from a .safetensors / .pt (weights_only) / .npz / .json file with "mean" and
    "std" (top level or under "latent_stats")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics file not found: {path}")
    if path.suffix == ".json":
        obj = json.loads(path.read_text())
    elif path.suffix == ".npz":
        with np.load(path) as f:
            obj = {k: f[k] for k in f.files}
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "mean" in obj and "std" in obj:
        return _as_stats(obj["mean"], obj["std"])
    stats = _stats_from(obj)
    if stats is None:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path} holds no latent statistics: expected 'mean' and 'std' [C], found {keys}")
    return stats


def _verified(path: Path, what: str, verify: str) -> None:
    """A training checkpoint its run's manifest lists is checked against it (size + sha256, or size
    only) before it is read, as a resume is: a damaged tokenizer would silently poison every latent."""
    try:
        listed = path.name in store.read_manifest(path.parent)
    except (OSError, ValueError):
        listed = False
    if listed:
        why = store.check_checkpoint(path, verify)
        if why is not None:
            raise ValueError(f"{what}: {path} is damaged: {why}; pass an older checkpoint of that run")


def _finite(state: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    bad = store.nonfinite_keys(state)
    if bad:
        raise ValueError(f"{what}: {path} holds non-finite weights in {bad[:6]}; it cannot be used")


def _read(
    path: Path, what: str, use_ema: bool, keep_ema: bool = False, verify: str = "full"
) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(state dict, model config or None for official-layout files, the other entries; with
    `keep_ema` these include the checkpoint's "ema" state).

    Our training checkpoints (train.py) hold "model", "ema" (EMA.state_dict: params + buffers),
    "model_config" and, for DiT^DH, "latent_stats", "tokenizer" and "time_shift"; our exports
    hold the model config as safetensors metadata "config" beside "latent_mean" / "latent_std" /
    "time_shift" / "tokenizer".
    """
    if path.suffix == ".safetensors":
        state, meta = store.read_safetensors(path, verify)
        config = meta.get("config")
        return state, config if isinstance(config, dict) else None, meta
    _verified(path, what, verify)
    obj = store.load_checkpoint(path)
    if isinstance(obj, Mapping) and "sharded" in obj and "model" not in obj:
        export = next(iter(sorted(path.parent.glob("*_ema.safetensors"))), None)
        if use_ema and export is not None:
            log.info("%s is a sharded FSDP checkpoint: reading the run's EMA export %s", path, export)
            return _read(export, what, use_ema, keep_ema, verify)
        shards = path.parent / obj["sharded"]["dir"]
        raise ValueError(
            f"{what}: {path} is a sharded FSDP checkpoint (its weights are the shards in {shards}): load "
            f"the run's EMA export (written at its end), or consolidate the shards with `python -m "
            f"torch.distributed.checkpoint.format_utils dcp_to_torch {shards} full.pt`"
        )
    if isinstance(obj, Mapping) and "model_config" in obj and ("model" in obj or "ema" in obj):
        ema = obj.get("ema")
        if use_ema and isinstance(ema, Mapping):
            # EMA.state_dict() keeps parameters and buffers apart; a plain state dict is used as is.
            state = {**ema["params"], **ema["buffers"]} if "params" in ema else dict(ema)
        else:
            state = dict(obj["model"])
        skip = ("model", "optimizer", "disc", "disc_optimizer") + (() if keep_ema else ("ema",))
        return state, dict(obj["model_config"]), {k: v for k, v in obj.items() if k not in skip}
    from rectok.checkpoints.official import read_state_dict

    return read_state_dict(path), None, {}


def _strict_load(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    # EMA.state_dict() also holds non-persistent buffers (RoPE tables), which the model derives itself.
    derived = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in derived}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the model its config describes: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}"
        )
    model.load_state_dict(state, strict=True)


def saved_tokenizer_config(config: Mapping[str, Any], path: Path) -> RecTokConfig:
    """The RecTokConfig stored with our checkpoints, without the semantic decoder (inference only)."""
    if "encoder_width" not in config:
        raise ValueError(f"{path}: its config is not a tokenizer config (keys {sorted(config)[:12]})")
    return replace(RecTokConfig.from_dict(dict(config)), semantic_dim=0)


def saved_dit_config(config: Mapping[str, Any], path: Path) -> DiTDHConfig:
    """The DiTDHConfig stored with our checkpoints."""
    if "hidden_size" not in config:
        raise ValueError(f"{path}: its config is not a DiT^DH config (keys {sorted(config)[:12]})")
    unknown = set(config) - set(DiTDHConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown DiT^DH config fields {sorted(unknown)}")
    return DiTDHConfig(**config)


def load_tokenizer(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    hint: str = "",
    keep_ema: bool = False,
    verify: str = "full",
    img_size: int | None = None,
) -> Loaded:
    """Our tokenizer checkpoint (.pt / run folder / .safetensors export) or an official-layout file.

    keep_ema: also keep a training checkpoint's EMA state (EMA.state_dict layout) in
    `.raw["ema"]`, which the pixel-decoder stage continues; off by default, as it holds a
    second copy of the weights.
    verify: "full" checks a checkpoint against its run's manifest (size + sha256) and an export
    against its .sha256 sidecar; "size" checks sizes only. Non-finite weights are refused.
    img_size: build the tokenizer for these images (a multiple of its patch size) when it differs
    from the saved size; the learned position embeddings (and a kept EMA state's) are resampled
    bicubically to the new patch grid, everything else loads as saved."""
    what = "tokenizer checkpoint"
    path = resolve_path(path, what, hint)
    state, config, extra = _read(path, what, use_ema, keep_ema, verify)
    _finite(state, what, path)
    if config is None:
        from rectok.checkpoints.official import load_official_tokenizer

        model, resampled_from = load_official_tokenizer(state), None
        saved = model.cfg  # resampled after the conversion, as the official layout fixes the sizes
        if img_size is not None and resolution.grid_for(img_size, saved.patch_size) != saved.grid_size:
            _log_tokenizer_resample(path, saved, img_size, state_keys=model.state_dict())
            model, resampled_from = resolution.resize_tokenizer(model, img_size), saved.img_size
        return Loaded(model.eval(), path, "official", resampled_from=resampled_from)
    cfg = saved_tokenizer_config(config, path)
    state = {k: v for k, v in state.items() if not k.startswith("semantic_decoder.")}
    resampled_from = None
    if img_size is not None and resolution.grid_for(img_size, cfg.patch_size) != cfg.grid_size:
        _log_tokenizer_resample(path, cfg, img_size, state_keys=state)
        new_grid = img_size // cfg.patch_size
        state = resolution.resample_tokenizer_state(state, cfg.grid_size, new_grid)
        if isinstance(extra.get("ema"), Mapping):
            extra["ema"] = _resampled_ema(extra["ema"], cfg.grid_size, new_grid)
        resampled_from, config = cfg.img_size, {**config, "img_size": img_size}
        cfg = replace(cfg, img_size=img_size)
    model = RecTok(cfg)
    _strict_load(model, state, path)
    return Loaded(model.eval(), path, "ours", dict(config), _stats_from(extra), extra, resampled_from)


def _log_tokenizer_resample(path: Path, cfg: RecTokConfig, img_size: int, state_keys: Mapping) -> None:
    parts = ", ".join(k.split(".")[0] for k in resolution.TOKENIZER_POS_EMBEDS if k in state_keys)
    old, new = cfg.grid_size, img_size // cfg.patch_size
    log.info(
        f"{path}: {parts} position embeddings resampled bicubically from grid {old}x{old} to "
        f"{new}x{new} ({cfg.img_size} px -> {img_size} px)"
    )


def _resampled_ema(ema: Mapping[str, Any], old_grid: int, new_grid: int) -> dict[str, Any]:
    """A training checkpoint's EMA state (EMA.state_dict layout, or a plain state dict) resampled."""
    if "params" in ema:
        return {
            **ema,
            "params": resolution.resample_tokenizer_state(ema["params"], old_grid, new_grid),
            "buffers": resolution.resample_tokenizer_state(ema["buffers"], old_grid, new_grid),
        }
    return resolution.resample_tokenizer_state(ema, old_grid, new_grid)


def load_dit(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    hint: str = "",
    verify: str = "full",
    grid_size: int | None = None,
) -> Loaded:
    """Our DiT^DH checkpoint (.pt / run folder / .safetensors export) or an official-layout file,
    verified as load_tokenizer does.

    grid_size: build the DiT^DH for latents of this grid (the tokenizer's img_size // patch_size)
    when it differs from the saved one; the fixed sin-cos position embedding is regenerated for it,
    every weight loads as saved. The stored time shift (`.time_shift`) stays the saved grid's."""
    what = "DiT^DH checkpoint"
    path = resolve_path(path, what, hint)
    state, config, extra = _read(path, what, use_ema, verify=verify)
    _finite(state, what, path)
    if config is None:
        from rectok.checkpoints.official import load_official_dit

        model, resampled_from = load_official_dit(state), None
        saved = model.config.grid_size
        if grid_size is not None and resolution.check_grid(grid_size) != saved:
            _log_dit_resample(path, saved, grid_size)
            model, resampled_from = resolution.resize_dit(model, grid_size), saved
        return Loaded(model.eval(), path, "official", resampled_from=resampled_from)
    stats = _stats_from(extra)
    cfg = saved_dit_config(config, path)
    resampled_from = None
    if grid_size is not None and resolution.check_grid(grid_size) != cfg.grid_size:
        _log_dit_resample(path, cfg.grid_size, grid_size)
        state = resolution.resample_dit_state(state, cfg.grid_size, grid_size)
        resampled_from, config = cfg.grid_size, {**config, "grid_size": grid_size}
        cfg = replace(cfg, grid_size=grid_size)
    model = DiTDH(cfg)
    _strict_load(model, state, path)
    return Loaded(model.eval(), path, "ours", dict(config), stats, extra, resampled_from)


def _log_dit_resample(path: Path, old: int, new: int) -> None:
    log.info(f"{path}: sin-cos position embedding regenerated for latent grid {old}x{old} -> {new}x{new}")
