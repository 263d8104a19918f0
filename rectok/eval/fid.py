"""FID and Inception Score from Inception-v3 pool3 features, and FID reference statistics.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). The trace term is computed in
float64 as sum_i sqrt(lambda_i) over the eigenvalues of the symmetric PSD matrix
S1^1/2 S2 S1^1/2 (similar to S1 S2, so the same spectrum), with tiny negative eigenvalues
from rounding clipped to zero. Unlike scipy.linalg.sqrtm on a non-symmetric product this
cannot return NaN or a complex number (USERS.md item 3; pytorch-fid #117).

Reference statistics are ADM-format npz files (`mu` [2048], `sigma` [2048, 2048]), e.g.
ADM's VIRTUAL_imagenet256_labeled.npz, or are computed from images (npz `arr_0` or a folder).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image_io import ImageSource
from .inception import INCEPTION_PORT, LOGITS_FEATURES, POOL_FEATURES, extract_features

IS_SPLITS = 10


@dataclass
class FIDStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    num_images: int | None = None  # None when read from a file that does not record it

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape
        if self.mu.ndim != 1 or self.sigma.shape != d * 2:
            raise ValueError(
                f"FID statistics need mu [D] and sigma [D, D], got {self.mu.shape}, {self.sigma.shape}"
            )

    @classmethod
    def from_features(cls, features: np.ndarray) -> FIDStats:
        """Mean and unbiased covariance (np.cov, N - 1) of features [N, D], in float64."""
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need features [N >= 2, D], got {features.shape}")
        f = features.astype(np.float64)
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))

    def save(self, path: str | Path) -> None:
        """ADM-format npz (mu, sigma; plus num_images), written atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        extra = {} if self.num_images is None else {"num_images": np.int64(self.num_images)}
        np.savez(tmp, mu=self.mu, sigma=self.sigma, **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FIDStats:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} holds no FID statistics (keys mu, sigma); found {sorted(f.keys())}")
            n = int(f["num_images"]) if "num_images" in f else None
            return cls(f["mu"], f["sigma"], n)


def npz_has_stats(path: str | Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    return {"mu.npy", "sigma.npy"} <= names


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, always real and >= 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Mathematically >= 0; identical statistics can land a few ulps below zero.
    return max(fid, 0.0)


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """IS (mean, std over `splits` consecutive equal chunks, as ADM and TTUR) from unbiased logits [N, K]."""
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need logits [N >= {splits}, K], got {logits.shape}")
    x = logits.astype(np.float64)
    log_p = x - x.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    n, scores = len(x), []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        log_q = np.log(p[sl].mean(0, keepdims=True))
        kl = (p[sl] * (log_p[sl] - log_q)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def activations(
    net, source: ImageSource, batch_size: int = 100, progress: bool = True
) -> dict[str, np.ndarray]:
    """Inception features of every image in `source` -> {name: float32 [N, D]}."""
    return extract_features(
        net, source.batches(batch_size), len(source), desc=f"inception {source.describe()}", progress=progress
    )


def reference_stats(
    ref: str | Path | ImageSource, net=None, batch_size: int = 100, progress: bool = True
) -> tuple[FIDStats, str]:
    """FID statistics of a reference: an npz holding mu/sigma (read, no network needed), or images
    (npz `arr_0`, a folder, or an ImageSource) pushed through `net`. Returns (stats, description)."""
    if not isinstance(ref, ImageSource):
        ref = Path(ref)
        if ref.suffix == ".npz" and ref.is_file() and npz_has_stats(ref):
            return FIDStats.load(ref), "precomputed statistics (mu, sigma)"
        ref = ImageSource(ref)
    if net is None:
        raise ValueError(f"reference {ref.describe()} holds images, so an Inception network is needed")
    feats = activations(net, ref, batch_size, progress)[POOL_FEATURES]
    return FIDStats.from_features(feats), f"{len(feats)} images"


def fid_metric_name(reference: str | Path | None, name: str | None = None) -> str:
    """An unambiguous metric name: `name` when given; "gFID-ADM" against ADM's ImageNet reference
    batches (VIRTUAL_imagenet*.npz); otherwise "FID-vs-<reference file stem>"."""
    if name:
        return name
    if reference is None:
        return "FID"
    stem = Path(reference).name.removesuffix(".npz")
    return "gFID-ADM" if stem.startswith("VIRTUAL_imagenet") else f"FID-vs-{stem}"


def evaluate_samples(
    samples: ImageSource,
    net,
    inception_info: dict,
    reference: str | Path | ImageSource | None = None,
    *,
    name: str | None = None,
    compute_is: bool = True,
    batch_size: int = 100,
    progress: bool = True,
) -> dict:
    """FID against `reference` (if given) and IS of `samples`, as a JSON-ready result dict."""
    if reference is None and not compute_is:
        raise ValueError("nothing to compute: give a reference for FID and/or enable IS")
    feats = activations(net, samples, batch_size, progress)
    result: dict = {"metrics": {}, "num_samples": len(samples), "samples": samples.describe()}
    if reference is not None:
        ref_stats, ref_desc = reference_stats(reference, net, batch_size, progress)
        ref_path = reference.describe() if isinstance(reference, ImageSource) else str(reference)
        metric = fid_metric_name(ref_path if not isinstance(reference, ImageSource) else None, name)
        result["metrics"][metric] = fid_from_stats(FIDStats.from_features(feats[POOL_FEATURES]), ref_stats)
        result["reference"] = {"path": ref_path, "content": ref_desc, "num_images": ref_stats.num_images}
    if compute_is:
        mean, std = inception_score(feats[LOGITS_FEATURES])
        result["metrics"]["IS"], result["metrics"]["IS_std"] = mean, std
        result["is_splits"] = IS_SPLITS
    result["inception"] = {**inception_info, "port": INCEPTION_PORT, "fid_features": "pool3 (2048)"}
    return result


def write_json(obj: dict, path: str | Path) -> None:
    """Write a result file atomically (a crash never leaves half a JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
