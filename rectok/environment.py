"""What produced a result: library versions, devices, ranks, the code's git state and the command
line. One report for training runs (environment.json and every checkpoint), sample.py's result
file and the benchmarks (USERS.md: pinned, reported environments)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("triton", "timm", "einops", "safetensors", "numpy", "nvidia-dali-cuda120", "nvidia-dali-cuda130")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(root: Path = ROOT) -> dict[str, str | bool] | None:
    """{"commit", "dirty"} of the checkout this code runs from; None outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | str | None = None) -> dict:
    """A JSON-able report; `device` names the device the work ran on (default: CUDA if present)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only=True refuses
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        **{dist: _version(dist) for dist in LIBRARIES},
        "device": device_name(device),
        "gpus": gpus,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "platform": platform.platform(),
        "git": git_state(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
