"""Online evaluation during tokenizer training, as the release does (`--eval_every N` epochs): the
EMA tokenizer's PSNR / SSIM and rFID on a fixed held-out subset (`--data.online_eval_images`
images evenly spread over the val split), the rFID against the Inception statistics of that same
subset, computed once and kept in the run folder.

A monitor, not a paper number: a few thousand images scored against their own statistics is not
the 50k-image ImageNet-val protocol behind the paper's rFID, so the metric is logged as
`online/rfid_subset` and every report says so. Rank 0 evaluates while the other ranks wait.
Without the FID Inception weights (nothing is downloaded) it logs PSNR / SSIM only, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from rectok.data.loading import build_loader
from rectok.eval.fid import FIDStats
from rectok.eval.inception import POOL_FEATURES, extract_features, load_inception
from rectok.eval.reconstruction import evaluate_reconstruction
from rectok.sampling.images import to_uint8

log = logging.getLogger(__name__)

CAVEAT = (
    "rFID of a held-out subset against its own statistics: a training monitor, not comparable "
    "with paper numbers"
)


class OnlineEvaluator:
    """The fixed evaluation subset, the Inception network (or None) and the subset's statistics."""

    def __init__(
        self,
        root: Path,
        split: str | None,
        count: int,
        image_size: int,
        device: torch.device,
        run_dir: Path,
        inception_weights: str = "",
        batch_size: int = 64,
        num_workers: int = 4,
    ) -> None:
        self.device, self.batch_size = device, batch_size
        self.loader = build_loader(
            root,
            split=split,
            batch_size=batch_size,
            image_size=image_size,
            train=False,
            hflip=False,
            num_workers=num_workers,
            backend="pil",
            spread=count,
        )
        self.num_images = len(self.loader.samples)
        try:
            self.inception, _ = load_inception(inception_weights or None, (POOL_FEATURES,), device)
        except FileNotFoundError as err:
            log.warning("online evaluation without rFID (PSNR / SSIM only): %s", err)
            self.inception = None
        self.reference = None
        if self.inception is not None:
            path = run_dir / f"online_eval_reference_{self.num_images}.npz"
            if path.is_file():
                self.reference = FIDStats.load(path)
            else:
                self.reference = self._reference_stats()
                self.reference.save(path)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Under fork_rng: iterating a DataLoader draws a seed from the global RNG, which the
        # checkpoints record for bit-identical resumes.
        with torch.random.fork_rng(devices=[]):
            for batch in self.loader:
                yield batch["image"], batch["label"]

    @torch.no_grad()
    def _reference_stats(self) -> FIDStats:
        """Inception statistics of the subset's own images (rounded to uint8: exact for JPEG pixels)."""
        images = (to_uint8(x.float() * 0.5 + 0.5, "round") for x, _ in self._batches())
        features = extract_features(self.inception, images, self.num_images, progress=False)[POOL_FEATURES]
        return FIDStats.from_features(np.asarray(features))

    def __call__(self, tok: torch.nn.Module, autocast: torch.dtype | None = None) -> dict[str, float]:
        """{"online/psnr", "online/ssim"[, "online/rfid_subset"]} of `tok` (posterior mean, eval mode)."""
        was_training = tok.training
        result = evaluate_reconstruction(
            tok,
            self._batches(),
            inception=self.inception,
            reference=self.reference,
            name="rFID",
            device=self.device,
            autocast=autocast,
            progress=False,
        )
        tok.train(was_training)
        metrics = {"online/psnr": result["metrics"]["PSNR"], "online/ssim": result["metrics"]["SSIM"]}
        if self.inception is not None:
            metrics["online/rfid_subset"] = result["metrics"]["rFID"]
        return metrics
