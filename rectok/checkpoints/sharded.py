"""Sharded checkpoints of FSDP runs with torch.distributed.checkpoint (DCP).

Every rank writes its own shards of the model, optimizer and EMA into run_dir/ckpt_<step>.dcp/:
nothing is gathered onto one rank, so a checkpoint costs each GPU only its shard. Rank 0 then
writes the small ckpt_<step>.pt (position, RNG states, config, latent statistics, ...) through the
usual store (atomic, manifest, `latest`, keep_last) with an entry "sharded" naming the folder and
its files, which resume checks before it loads. DCP reshards on load, so a run may resume on
another number of ranks.

The folder is written as .ckpt_<step>.dcp.partial and renamed once every rank has finished, so a
killed save never leaves a folder that looks complete. `async_save` returns at once and writes in
the background (the next save, or the end of the run, waits for it before the .pt is written).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from rectok.checkpoints import store

SUFFIX = store.SHARD_SUFFIX


def shard_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / (store.checkpoint_name(step).removesuffix(store.SUFFIX) + SUFFIX)


def _partial(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class PendingSave:
    """A sharded save in flight: `finish()` waits for every rank's shards, renames the folder into
    place (rank 0) and then runs `on_done(listing)` (rank 0: write the .pt that points at it)."""

    def __init__(self, final: Path, future: Future | None, on_done: Callable[[dict], None]) -> None:
        self.final, self.future, self.on_done = final, future, on_done

    def finish(self) -> dict:
        if self.future is not None:
            self.future.result()
        _barrier()  # every rank's files (and rank 0's metadata) are written
        listing: dict[str, Any] = {}
        if _is_main():
            partial = _partial(self.final)
            if self.final.exists():  # an earlier save of the same step (a resumed, redone step)
                shutil.rmtree(self.final)
            partial.rename(self.final)
            listing = {
                "dir": self.final.name,
                "files": {p.name: p.stat().st_size for p in sorted(self.final.iterdir())},
            }
            self.on_done(listing)
        _barrier()
        return listing


_ASYNC_GROUP = None


def _async_group():
    """A gloo process group for async saves (created once, collectively, on first use)."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and dist.is_available() and dist.is_initialized():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def save_sharded(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    on_done: Callable[[dict], None],
    async_save: bool = False,
) -> PendingSave:
    """Start writing `state` (nested dicts of DTensors / tensors: every rank passes its own shards)
    as run_dir/ckpt_<step>.dcp/; collective. Call `.finish()` on the result (at once, or before the
    next save with async_save) to complete it."""
    final = shard_dir(run_dir, step)
    partial = _partial(final)
    if _is_main() and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    _barrier()
    writer = dcp.FileSystemWriter(str(partial))
    if async_save:
        # The shards are copied to host memory before this returns; the background writer then
        # needs collectives of its own, on a group that training's collectives never use.
        future = dcp.async_save(state, storage_writer=writer, process_group=_async_group())
        return PendingSave(final, future, on_done)
    dcp.save(state, storage_writer=writer)
    return PendingSave(final, None, on_done)


def check_sharded(run_dir: Path, listing: dict) -> str | None:
    """Why the sharded folder a checkpoint points at must not be loaded (None when it is complete)."""
    folder = Path(run_dir) / listing["dir"]
    if not folder.is_dir():
        return f"its shards {folder} are missing"
    for name, size in listing["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"its shard file {path} is missing or has another size than when it was written"
    return None


def load_sharded(run_dir: Path, listing: dict, state: dict[str, Any]) -> None:
    """Load a sharded checkpoint in place into `state` (the same nested layout as saved, holding this
    rank's DTensors: DCP fills each with its shard, resharding across world sizes); collective."""
    problem = check_sharded(run_dir, listing)
    if problem is not None:
        raise ValueError(f"cannot resume from {run_dir}: {problem}; resume from an earlier checkpoint")
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(Path(run_dir) / listing["dir"])))


def prune(run_dir: Path) -> None:
    """Rank 0: delete the shard folders whose ckpt_<step>.pt keep_last has removed."""
    kept = {p.name.removesuffix(store.SUFFIX) for p in store.list_checkpoints(run_dir)}
    for folder in Path(run_dir).glob(f"{store.PREFIX}*{SUFFIX}"):
        if folder.is_dir() and folder.name.removesuffix(SUFFIX) not in kept:
            shutil.rmtree(folder, ignore_errors=True)
