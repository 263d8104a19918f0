"""Training checkpoints that survive crashes and load with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values (model, EMA, optimisers,
scaler, step, epoch, data position, RNG states, resolved config). Writing is atomic:
the file goes to a temporary name in the same folder, is fsync'ed and renamed with
os.replace, so a crash leaves either the old or the new file, never a torn one. The
`latest` pointer file names the newest checkpoint (updated the same way), older
checkpoints beyond `keep_last` are deleted, and `manifest.json` lists each file with
its step, sha256 and config. Inference weights go to safetensors with the config
(JSON) in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
MANIFEST = "manifest.json"
PREFIX = "ckpt_"
SUFFIX = ".pt"


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as tensors / plain types (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when present and a GPU is initialised)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- atomic IO
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temp file next to `path`, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_finite(state: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Raise if any floating-point tensor of `state` holds NaN or Inf (such weights are never saved)."""
    bad = [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise FloatingPointError(
            f"refusing to write a checkpoint: non-finite values in {what} tensors "
            f"{bad[:8]}{' ...' if len(bad) > 8 else ''}"
        )


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}{SUFFIX}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(
        p for p in run_dir.glob(f"{PREFIX}*{SUFFIX}") if p.name[len(PREFIX) : -len(SUFFIX)].isdigit()
    )


def save_checkpoint(
    run_dir: str | os.PathLike,
    state: dict[str, Any],
    step: int,
    keep_last: int = 3,
    model_keys: tuple[str, ...] = ("model", "ema", "disc"),
) -> Path:
    """Write `state` as run_dir/ckpt_<step>.pt atomically, point `latest` at it, update the manifest
    and delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything).

    Every floating tensor under `model_keys` (flat state dicts, or nested dicts of them) must be
    finite, else FloatingPointError and nothing is written.
    """
    for key in model_keys:
        if key in state and state[key] is not None:
            _check_nested(state[key], key)
    run_dir = Path(run_dir)
    path = run_dir / checkpoint_name(step)
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(run_dir / LATEST, lambda f: f.write(path.name.encode() + b"\n"))

    manifest = read_manifest(run_dir)
    manifest[path.name] = {
        "step": int(step),
        "epoch": state.get("epoch"),
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "config": state.get("config"),
    }
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
            manifest.pop(old.name, None)
    atomic_write(run_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2, default=str).encode()))
    return path


def _check_nested(value: Any, what: str) -> None:
    if isinstance(value, Mapping):
        tensors = {k: v for k, v in value.items() if torch.is_tensor(v)}
        check_finite(tensors, what)
        for k, v in value.items():
            if isinstance(v, Mapping):
                _check_nested(v, f"{what}.{k}")


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by run_dir/latest, else the newest ckpt_*.pt, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        target = run_dir / pointer.read_text().strip()
        if target.is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """--resume value -> checkpoint path. "auto": the latest in run_dir, or None to start fresh;
    a folder: its latest; a file: itself. A path that does not exist is an error."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint (ckpt_*.pt) in that folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (use 'auto' to pick the latest)")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; a run folder resolves to its latest checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} could not be read with weights_only=True (corrupt or not ours?): {err}"
        ) from err


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """True when the file's sha256 matches its manifest entry (False when it differs or is not listed)."""
    path = Path(path)
    entry = read_manifest(path.parent).get(path.name)
    return entry is not None and entry["sha256"] == sha256(path)


# ----------------------------------------------------------------------------- inference export
def export_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    **metadata: Any,
) -> Path:
    """Write inference weights (e.g. the EMA model) to safetensors, atomically, with `config` as JSON
    in the metadata under "config" (and every extra keyword JSON-encoded under its name)."""
    from safetensors.torch import save

    check_finite(state_dict, "exported")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"config": json.dumps(config, default=str), "format": "pt"}
    meta.update({k: json.dumps(v, default=str) for k, v in metadata.items()})
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata with JSON values decoded) of a file written by export_safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return load_file(str(path)), meta
