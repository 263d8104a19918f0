"""Training checkpoints that survive crashes and load with `weights_only=True`.

A checkpoint is a dict of tensors and plain Python values (model, EMA, optimisers,
scaler, step, epoch, data position, RNG states, resolved config). Writing is atomic:
the file goes to a temporary name in the same folder, is fsync'ed and renamed with
os.replace, so a crash leaves either the old or the new file, never a torn one. The
`latest` pointer file names the newest checkpoint (updated the same way), older
checkpoints beyond `keep_last` are deleted, and `manifest.json` lists each file with
its step, sha256 and config. Inference weights go to safetensors with the config
(JSON) in the metadata.

Resuming never trusts a file blindly: resolve_resume checks size and sha256 against the
manifest before torch.load, walks back past damaged checkpoints under "auto" (warning which
and why) and refuses a damaged explicit file; prepare_run_dir, at start, removes temp files
of interrupted saves and refuses to restart a used run folder at step 0 unless told to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
MANIFEST = "manifest.json"
PREFIX = "ckpt_"
SUFFIX = ".pt"

log = logging.getLogger("rectok.checkpoints.store")


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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file_object) on a temp file next to `path`, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less the umask)
    # so that group members on a shared cluster can read checkpoints, manifests and exports.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not err.filename:
            # A full disk surfaces as a bare "[Errno 28] No space left on device" from inside
            # torch.save: name the file, and say that the previous file of that name is intact.
            why = f"{err.strerror or err} (nothing was replaced: any previous copy is intact)"
            raise OSError(err.errno, why, str(path)) from err
        raise
    _fsync_dir(path.parent)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nonfinite_keys(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold NaN or Inf."""
    return [
        k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()
    ]


def check_finite(state: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Raise if any floating-point tensor of `state` holds NaN or Inf (such weights are never saved)."""
    bad = nonfinite_keys(state)
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


RESUME_MODES = ("", "auto", "never")  # besides a checkpoint file or a run folder
VERIFY_MODES = ("full", "size")
# What a previous run leaves in its folder (config.json does not count: Run writes it first).
RUN_FILES = (LATEST, MANIFEST, "metrics.jsonl", "metrics.json")
# atomic_write's temp names: "." + target name + "." + mkstemp's 8 random characters + ".tmp".
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
SHARD_SUFFIX = ".dcp"  # the shard folders of FSDP checkpoints (rectok.checkpoints.sharded)
_PARTIAL_SHARDS_RE = re.compile(r"^\.ckpt_\d+\.dcp\.partial$")  # a shard folder being written


def previous_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Files in run_dir that a previous run wrote: checkpoints (readable or not; with the shard
    folders of FSDP runs), `latest`, the manifest and non-empty metrics. Empty when the folder is
    new (or missing)."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(f"{PREFIX}*{SUFFIX}") if p.is_file()] if run_dir.is_dir() else []
    found += [p for p in run_dir.glob(f"{PREFIX}*{SHARD_SUFFIX}") if p.is_dir()] if run_dir.is_dir() else []
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_file() and (name in (LATEST, MANIFEST) or p.stat().st_size > 0):
            found.append(p)
    return sorted(found)


def remove_temp_files(run_dir: str | os.PathLike) -> tuple[int, int]:
    """Delete the temp files of interrupted atomic_write calls in run_dir (only names of our own
    pattern, never anything else); returns (files removed, bytes freed) and logs them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return 0, 0
    count = freed = 0
    for p in run_dir.iterdir():
        if p.is_file() and _TEMP_RE.match(p.name):
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            count, freed = count + 1, freed + size
        elif p.is_dir() and _PARTIAL_SHARDS_RE.match(p.name):
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            count, freed = count + 1, freed + size
    if count:
        log.warning(
            "removed %d temp file(s) of interrupted saves from %s (%s)", count, run_dir, _human(freed)
        )
    return count, freed


def prepare_run_dir(resume: str | None, run_dir: str | os.PathLike, is_main: bool = True) -> list[Path]:
    """Called once at start on every rank, before the run writes anything into run_dir.

    Refuses (ValueError, on every rank alike: the check only reads) a fresh start (--resume "")
    over a previous run. Rank 0 (`is_main`) also removes temp files of interrupted saves and,
    with --resume never, moves the previous run's files to run_dir/previous-<time>/ so that its
    checkpoints (maybe at higher steps, which keep_last would prefer) and metrics cannot mix with
    the new run's; returns the moved paths.
    """
    previous = previous_run_files(run_dir)
    if previous and not resume:
        raise ValueError(_fresh_refusal(run_dir, previous, "--resume is not set"))
    if not is_main:
        return []
    remove_temp_files(run_dir)
    # A run killed before its first save left metrics but no state: there is nothing to resume and
    # nothing to lose, so --resume auto starts it again (a retry loop must not stall on it), moving
    # those metrics aside like --resume never.
    never_saved = previous and not any(
        p.name.startswith(PREFIX) or p.name in (LATEST, MANIFEST) for p in previous
    )
    if not previous or not (resume == "never" or (resume == "auto" and never_saved)):
        return []  # a resume: resolve_resume decides (and refuses when nothing is usable)
    stamp, n = time.strftime("previous-%Y%m%d-%H%M%S"), 1
    archive = Path(run_dir) / stamp
    while archive.exists():  # two restarts within one second
        archive, n = Path(run_dir) / f"{stamp}-{n}", n + 1
    archive.mkdir()
    moved = [Path(shutil.move(str(p), archive / p.name)) for p in previous]
    why = "--resume never" if resume == "never" else "--resume auto: no checkpoint was ever written here"
    log.warning("%s: starting at step 0; moved the previous run's %d file(s) to %s", why, len(moved), archive)
    return moved


def _fresh_refusal(run_dir: str | os.PathLike, previous: list[Path], why: str) -> str:
    names = ", ".join(p.name for p in previous[:6]) + (" ..." if len(previous) > 6 else "")
    return (
        f"{run_dir} holds a previous run ({names}) and {why}: refusing to start fresh at step 0 over it. "
        "Pass --resume auto to continue it, --resume never to start over (its files move to "
        "previous-<time>/), or choose another --run_dir"
    )


def check_checkpoint(path: str | os.PathLike, verify: str = "full") -> str | None:
    """Why `path` must not be resumed from (None when it passes): missing, empty, a size or
    (verify="full") sha256 different from its manifest entry. A file the manifest does not list
    passes with a warning (nothing to compare with; torch.load still has to read it)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"checkpoint verify mode must be one of {', '.join(VERIFY_MODES)}; got {verify!r}")
    path = Path(path)
    if not path.is_file():
        return "file does not exist"
    size = path.stat().st_size
    if size == 0:
        return "file is empty (0 bytes; a save interrupted before the data reached the disk?)"
    try:
        entry = read_manifest(path.parent).get(path.name)
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): %s is not verified", path.parent / MANIFEST, err, path.name)
        return None
    if entry is None:
        log.warning("%s is not listed in %s: not verified against a sha256", path, MANIFEST)
        return None
    if entry.get("bytes") is not None and size != int(entry["bytes"]):
        return f"size {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten?)"
    if verify == "size":
        log.info(
            "%s: size matches the manifest (%s; sha256 not checked: --ckpt_verify size)", path, _human(size)
        )
        return None
    t0 = time.perf_counter()
    digest = sha256(path)
    took = time.perf_counter() - t0
    if digest != entry.get("sha256"):
        listed = str(entry.get("sha256"))[:12]
        return f"sha256 {digest[:12]}... differs from the manifest's {listed}... (damaged bytes)"
    log.info("%s: sha256 verified against the manifest (%s in %.3f s)", path, _human(size), took)
    return None


def resolve_resume(
    resume: str | None,
    run_dir: str | os.PathLike,
    verify: str = "full",
    map_location: str | torch.device = "cpu",
) -> tuple[Path | None, dict[str, Any] | None]:
    """--resume value -> (checkpoint path, loaded state), or (None, None) to start fresh.

    "" / "never": start fresh (prepare_run_dir has refused or archived a previous run).
    "auto" (run_dir) or a folder: the newest checkpoint that verifies (check_checkpoint) and
    loads; damaged newer ones are skipped with a warning naming each and why. "auto" with no
    usable checkpoint starts fresh only in a folder without a previous run (else ValueError);
    a folder with none is an error. A file: itself, and a damaged one is a ValueError.
    """
    if not resume or resume == "never":
        return None, None
    if resume != "auto":
        path = Path(resume)
        if path.is_file():
            why = check_checkpoint(path, verify)
            if why is not None:
                raise ValueError(f"--resume {resume}: cannot resume from {path}: {why}")
            return path, load_checkpoint(path, map_location)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume {resume}: no such checkpoint file or folder (use 'auto' to pick the latest)"
            )
        run_dir = path
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)[::-1]  # newest first
    pointer = run_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if named and not (run_dir / named).is_file():
        log.warning("%s names %s, which does not exist", pointer, named)
    skipped: list[str] = []
    for path in candidates:
        why = check_checkpoint(path, verify)
        if why is None:
            try:
                state = load_checkpoint(path, map_location)
            except ValueError as err:
                cause = err.__cause__ or err  # some (EOFError()) have an empty message: name the type
                why = f"torch.load failed: {type(cause).__name__}: {cause}"
            else:
                if skipped or (named and named != path.name):
                    log.warning(
                        "resuming from %s instead of %s; skipped: %s",
                        path.name,
                        named or candidates[0].name,
                        "; ".join(skipped) or "none",
                    )
                return path, state
        log.warning("skipping checkpoint %s: %s", path, why)
        skipped.append(f"{path.name} ({why})")
    reasons = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    if resume != "auto" and skipped:
        raise ValueError(f"--resume {resume}: no usable checkpoint in that folder{reasons}")
    if resume != "auto":
        raise FileNotFoundError(f"--resume {resume}: no checkpoint (ckpt_*.pt) in that folder")
    previous = previous_run_files(run_dir)
    if previous:
        raise ValueError(_fresh_refusal(run_dir, previous, f"no checkpoint in it is usable{reasons}"))
    return None, None


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
    """True when the file's size and sha256 match its manifest entry (False when they differ or it
    is not listed)."""
    path = Path(path)
    try:
        listed = read_manifest(path.parent).get(path.name) is not None
    except (OSError, ValueError):
        return False
    return listed and check_checkpoint(path, "full") is None


def _human(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"


# ----------------------------------------------------------------------------- inference export
def sha256_sidecar(path: str | os.PathLike) -> Path:
    """<file>.sha256 beside an export, in `sha256sum` format, so `sha256sum -c` checks it too."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def export_safetensors(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    **metadata: Any,
) -> Path:
    """Write inference weights (e.g. the EMA model) to safetensors, atomically, with `config` as JSON
    in the metadata under "config" (and every extra keyword JSON-encoded under its name), and its
    sha256 to <file>.sha256 (written after the file: a crash between the two leaves an export without
    a sidecar, which reads unverified, never a sidecar that condemns a good file)."""
    from safetensors.torch import save

    check_finite(state_dict, "exported")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"config": json.dumps(config, default=str), "format": "pt"}
    meta.update({k: json.dumps(v, default=str) for k, v in metadata.items()})
    data = save(tensors, metadata=meta)
    path = Path(path)
    sidecar = sha256_sidecar(path)
    sidecar.unlink(missing_ok=True)  # never leave the old file's digest beside the new file
    atomic_write(path, lambda f: f.write(data))
    line = f"{hashlib.sha256(data).hexdigest()}  {path.name}\n"
    atomic_write(sidecar, lambda f: f.write(line.encode()))
    return path


def check_export(path: str | os.PathLike, verify: str = "full") -> str | None:
    """Why an exported .safetensors must not be loaded (None when it passes): its sha256 differs from
    its <file>.sha256 sidecar. Files without a sidecar (official, older, or copied alone) pass with a
    debug note; verify="size" skips the digest (safetensors still checks the header and sizes)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {', '.join(VERIFY_MODES)}; got {verify!r}")
    path, sidecar = Path(path), sha256_sidecar(path)
    if verify == "size" or not sidecar.is_file():
        log.debug("%s: not verified against a sha256 sidecar", path)
        return None
    listed = sidecar.read_text().split()
    if not listed:
        return f"its sidecar {sidecar.name} is empty"
    t0 = time.perf_counter()
    digest = sha256(path)
    if digest != listed[0]:
        return f"sha256 {digest[:12]}... differs from {sidecar.name}'s {listed[0][:12]}... (damaged bytes)"
    log.info("%s: sha256 verified (%.3f s)", path, time.perf_counter() - t0)
    return None


def read_safetensors(
    path: str | os.PathLike, verify: str = "full"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata with JSON values decoded) of a file written by export_safetensors,
    checked against its sha256 sidecar first (check_export). A damaged or unreadable file is a
    ValueError naming it and why."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    why = check_export(path, verify)
    if why is not None:
        raise ValueError(f"{path} is damaged: {why}; re-export it or restore a copy")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # SafetensorError (truncated, bad header) and friends
        raise ValueError(
            f"{path} is not a readable .safetensors file (truncated or damaged?): {err}"
        ) from err
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return state, meta
