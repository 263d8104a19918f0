"""What a training run shows a person: image grids (reconstructions, samples) and metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rectok.checkpoints import store
from rectok.eval.image_metrics import to_uint8
from rectok.sampling.generate import save_grid
from rectok.training.config import TrainConfig
from rectok.training.runtime import Run


def save_image_rows(rows: list[torch.Tensor], path: Path) -> None:
    """One PNG with a row per tensor; every row [n, 3, H, W] in [0, 1], rounded to the nearest uint8."""
    images = to_uint8(torch.cat([row.float() for row in rows]), rounding="round")  # (rows * n, H, W, 3)
    save_grid(images.cpu().numpy(), path, ncol=len(rows[0]))


def write_summary(run: Run, cfg: TrainConfig, result: dict[str, Any]) -> None:
    """metrics.json: loss at the start and end of this run (mean of the first / last 10 steps), held-out
    PSNR before and after and the held-out images used / skipped (tokenizer stages), unreadable training
    images skipped, steps, wall time."""
    if not run.info.is_main:
        return
    h = [v for v in result["history"] if math.isfinite(v)]
    k = min(10, max(len(h) // 2, 1))
    summary = {
        "stage": cfg.stage,
        "preset": cfg.preset,
        "steps": result["step"],
        "steps_this_run": len(result["history"]),
        "loss_start": float(np.mean(h[:k])) if h else None,
        "loss_end": float(np.mean(h[-k:])) if h else None,
        "nonfinite_steps": result["nonfinite_total"],
        "wall_s": round(result["wall_s"], 1),
        "images_per_s": round(cfg.global_batch * len(result["history"]) / max(result["wall_s"], 1e-9), 2),
    }
    if "eval_start" in result:
        summary["heldout_psnr_start"] = result["eval_start"]
        summary["heldout_psnr_end"] = result["eval_end"]
        summary["heldout_images"] = result["heldout_images"]  # used, not requested: unreadable ones drop
        summary["heldout_skipped"] = result["heldout_skipped"]
    if "skipped_images" in result:  # unreadable training images substituted by the loader
        summary["skipped_images"] = result["skipped_images"]
    store.atomic_write(
        run.run_dir / "metrics.json", lambda f: f.write(json.dumps(summary, indent=2).encode())
    )
    run.print("summary: " + json.dumps(summary))
