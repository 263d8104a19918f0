"""Linear probing along the forward flow, the paper's central diagnostic (SPEC section 8).

For each tau: z_t = (1 - tau) z + tau eps on the frozen tokenizer's posterior-mean tokens
z [B, L, C], with eps fixed per sample (seeded by the sample's index, so independent of the
batch size), mean-pooled over tokens -> [N, C]. A multinomial logistic regression (standardised
features, L2 weight decay on the weights, not the bias) is fit on the train split and scored on
the held-out split. Flow semantic distillation is what keeps accuracy high as tau grows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rectok.kernels import flow_interpolate

from .fid import write_json
from .image_io import first_images

DEFAULT_TAUS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class ProbeConfig:
    weight_decay: float = 1e-4  # objective: mean cross-entropy + weight_decay / 2 * ||W||^2
    optimizer: str = "lbfgs"  # "lbfgs": full batch, exact optimum; "adam": minibatches, for very large N
    max_iter: int = 500  # L-BFGS iterations
    epochs: int = 50  # Adam
    lr: float = 1e-3  # Adam
    batch_size: int = 4096  # Adam
    seed: int = 0  # noise eps (train: seed, val: seed + 1) and Adam's shuffling

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def sample_noise(indices: Sequence[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """eps [len(indices), *shape] float32 where sample i's noise depends only on (seed, i).

    numpy's SeedSequence mixes (seed, i) into the full generator state; torch's CPU generator
    would keep only 32 bits of a combined seed, so different seeds could collide.
    """
    return torch.from_numpy(
        np.stack(
            [np.random.default_rng([seed, int(i)]).standard_normal(shape, dtype=np.float32) for i in indices]
        )
    )


@torch.no_grad()
def pooled_flow_features(
    tok: torch.nn.Module,
    loader: Iterable,
    taus: Sequence[float],
    seed: int,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    autocast: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[dict[float, torch.Tensor], torch.Tensor]:
    """({tau: mean-pooled z_t [N, C] float32 on CPU}, labels [N] int64) over `loader`'s (images, labels).

    The loader must not shuffle: sample i's noise is seeded by its position i.
    """
    tok.eval()
    feats: dict[float, list[torch.Tensor]] = {float(t): [] for t in taus}
    labels = []
    for start, images, y in first_images(loader, max_images, "probe features", progress):
        x = images.to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
            moments = tok.encoder(x)  # (B, L, 2C)
        z = moments[..., : moments.shape[-1] // 2].float()  # (B, L, C), posterior mean
        eps = sample_noise(range(start, start + len(x)), tuple(z.shape[1:]), seed).to(z.device)
        for tau in feats:
            zt = flow_interpolate(z, eps, torch.full((len(z),), tau, device=z.device))  # (B, L, C)
            feats[tau].append(zt.mean(1).cpu())  # (B, C)
        labels.append(torch.as_tensor(y, dtype=torch.long).cpu())
    return {t: torch.cat(v) for t, v in feats.items()}, torch.cat(labels)


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (C, K) on standardised features
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (C,) train feature mean
    std: torch.Tensor  # (C,) train feature std (1 where constant)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.mean) - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> LinearProbe:
    """Multinomial logistic regression on standardised x [N, C] with labels y [N] in [0, num_classes)."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need features [N, C] and labels [N], got {tuple(x.shape)}, {tuple(y.shape)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(y.min())}, {int(y.max())}]")
    x = x.float()
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)

    def objective(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(xb @ w + b, yb) + 0.5 * cfg.weight_decay * w.square().sum()

    with torch.enable_grad():
        if cfg.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                [w, b],
                lr=1.0,
                max_iter=cfg.max_iter,
                history_size=20,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-6,
                tolerance_change=1e-9,
            )

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = objective(xs, y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.Adam([w, b], lr=cfg.lr)
            g = torch.Generator().manual_seed(cfg.seed)
            for _ in range(cfg.epochs):
                for idx in torch.randperm(len(xs), generator=g).split(cfg.batch_size):
                    idx = idx.to(xs.device)
                    opt.zero_grad()
                    objective(xs[idx], y[idx]).backward()
                    opt.step()
    return LinearProbe(w.detach(), b.detach(), mean, std)


def probe_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: ProbeConfig,
) -> float:
    """Held-out top-1 accuracy of a linear probe fit on `train` = (x, y), scored on `val`."""
    probe = fit_linear_probe(*train, num_classes, cfg)
    xv, yv = val
    return (probe.predict(xv).cpu() == yv.cpu()).float().mean().item()


def probe_along_flow(
    tok: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    taus: Sequence[float] = DEFAULT_TAUS,
    cfg: ProbeConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    max_train: int | None = None,
    max_val: int | None = None,
    autocast: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """{"accuracy": {tau: top-1}, counts, config}: one linear probe per tau on pooled z_t."""
    cfg = cfg or ProbeConfig()
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"taus must be a non-empty list of values in [0, 1], got {list(taus)}")
    tr, ytr = pooled_flow_features(tok, train_loader, taus, cfg.seed, device, max_train, autocast, progress)
    va, yva = pooled_flow_features(tok, val_loader, taus, cfg.seed + 1, device, max_val, autocast, progress)
    if min(ytr.min(), yva.min()) < 0:
        raise ValueError("probing needs class labels >= 0 (images in class sub-folders)")
    num_classes = int(max(ytr.max(), yva.max())) + 1
    acc = {}
    for tau in tr:
        acc[tau] = probe_accuracy(
            (tr[tau].to(device), ytr.to(device)), (va[tau].to(device), yva), num_classes, cfg
        )
    return {
        "accuracy": acc,
        "num_train": len(ytr),
        "num_val": len(yva),
        "num_classes": num_classes,
        "config": dataclasses.asdict(cfg),
        "features": "mean over tokens of z_t = (1 - tau) * posterior mean + tau * eps",
    }


def markdown_table(curves: dict[str, dict[float, float]]) -> str:
    """| tau | <label> ... | with accuracies in percent, one row per tau."""
    taus = sorted({t for c in curves.values() for t in c})
    lines = ["| tau | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for t in taus:
        cells = [f"{100 * c[t]:.2f}" if t in c else "-" for c in curves.values()]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_probe_curves(
    curves: dict[str, dict[float, float]], path: str | Path, num_classes: int | None = None
) -> None:
    """PNG of top-1 accuracy (%) against tau, one labelled curve per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, curve in curves.items():
        taus = sorted(curve)
        ax.plot(taus, [100 * curve[t] for t in taus], marker="o", label=label)
    if num_classes:
        ax.axhline(100 / num_classes, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel(r"$\tau$ in $z_\tau = (1-\tau)\,z + \tau\,\epsilon$")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_probe_report(
    results: dict[str, dict], out_dir: str | Path, meta: dict | None = None
) -> dict[str, Path]:
    """probe.json, probe.md and probe.png in `out_dir` for {label: probe_along_flow result}."""
    out_dir = Path(out_dir)
    curves = {label: r["accuracy"] for label, r in results.items()}
    num_classes = max(r["num_classes"] for r in results.values())
    paths = {"json": out_dir / "probe.json", "md": out_dir / "probe.md", "png": out_dir / "probe.png"}
    serial = {
        label: {**r, "accuracy": {f"{t:g}": a for t, a in r["accuracy"].items()}}
        for label, r in results.items()
    }
    write_json({"probe": serial, "meta": meta or {}}, paths["json"])
    paths["md"].write_text("Linear probe top-1 (%) on mean-pooled z_t\n\n" + markdown_table(curves))
    plot_probe_curves(curves, paths["png"], num_classes)
    return paths
