"""The summary a finished run leaves for people and scripts: metrics.json."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from rectok.checkpoints import store
from rectok.training.config import TrainConfig
from rectok.training.runtime import Run


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
        "ablation": cfg.ablation or None,  # None: the paper's setting
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
