"""Weights & Biases as an optional second log of a run (--wandb project/name), on rank 0 only.

wandb is not a dependency: `import_wandb` imports it when --wandb is set and otherwise fails
with one line before the run folder is touched. The W&B run id lives in the run folder
(wandb_id.txt), so that `--resume auto` continues the same W&B run.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import ModuleType

from rectok.checkpoints import store

ID_FILE = "wandb_id.txt"


def import_wandb(spec: str) -> ModuleType:
    """The wandb module for --wandb `spec` ("project" or "project/name"), or a ValueError that says
    what to do."""
    project, _, name = spec.partition("/")
    if not project or "/" in name:
        raise ValueError(f"--wandb {spec}: expected 'project' or 'project/name'")
    try:
        import wandb
    except ImportError as err:
        raise ValueError(
            f"--wandb {spec} needs the wandb package: pip install wandb, or drop --wandb"
        ) from err
    return wandb


def stable_id(run_dir: Path, moved: list[Path]) -> str:
    """The W&B run id of the run in `run_dir`: the stored one when this run continues the steps
    already there, else a new one (written to run_dir/wandb_id.txt). `moved`: the previous run's
    files that store.prepare_run_dir moved aside (--resume never); its id goes with them."""
    path = run_dir / ID_FILE
    if path.is_file():
        if store.previous_run_files(run_dir):  # a resume: same steps, same W&B run
            return path.read_text().strip()
        if moved:
            path.rename(moved[0].parent / ID_FILE)
    run_id = secrets.token_hex(6)  # os.urandom: draws nothing from the seeded generators
    store.atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


def start(wandb: ModuleType, spec: str, run_dir: Path, run_id: str, config: dict) -> str:
    """wandb.init for this run; returns the line that says whether W&B logs online or offline (or is
    disabled)."""
    project, _, name = spec.partition("/")
    name = name or run_dir.absolute().name
    # No mode=: W&B itself reads WANDB_MODE (offline, disabled) and `wandb offline` from the
    # environment, and an explicit mode would override the user's choice.
    run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, resume="allow", id=run_id)
    return f"W&B {run.settings.mode}: project {project}, run {name}, id {run_id}"  # W&B prints how to sync
