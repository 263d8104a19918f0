"""AdamW parameter groups, learning-rate schedules and gradient clipping (SPEC sections 5 and 6).

Schedules are functions of the optimizer step, evaluated every iteration, as the release
does with its fractional epoch (epoch + batch / batches_per_epoch); `LRSchedule` takes
its lengths in optimizer steps, and `train.py` converts epochs with the steps per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Name fragments of parameters that get no weight decay, as in the release's optimizer
# builder ("embed" covers patch/position embeddings and the decoder input projections,
# "token" mask tokens, "norm"/"ln" normalisation weights). Any parameter with fewer than
# two dimensions (biases, norm weights) is excluded as well.
NO_DECAY_KEYWORDS = ("bias", "norm", "ln_", "embed", "token", "gamma")

SCHEDULES = ("cosine", "constant", "const_linear")
FUSED_CHOICES = ("auto", "on", "off")  # --optim.fused


def use_fused(setting: str, device: torch.device) -> bool | None:
    """AdamW's implementation for --optim.fused. "auto": torch's fused kernel on CUDA and CPU, the
    devices it exists for (on CUDA one launch per parameter group instead of the foreach kernels;
    on a CPU a third of the time of the per-parameter loop: 3.9 vs 11.8 ms per step for rectok-tiny,
    measured side by side); "on": fused anywhere; "off": torch's default (foreach on CUDA, the
    loop elsewhere; what the release runs). Fused agrees with the default to float rounding
    (1e-7 after a few steps), not bit for bit; it is deterministic, so resumes stay exact."""
    if setting not in FUSED_CHOICES:
        raise ValueError(f"unknown optim.fused {setting!r}; choose one of {', '.join(FUSED_CHOICES)}")
    if setting == "on" or (setting == "auto" and device.type in ("cuda", "cpu")):
        return True
    return None


def no_weight_decay(name: str, param: torch.Tensor, keywords: Iterable[str] = NO_DECAY_KEYWORDS) -> bool:
    return param.ndim < 2 or any(k in name for k in keywords)


def param_groups(
    model: nn.Module, weight_decay: float, keywords: Iterable[str] = NO_DECAY_KEYWORDS
) -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed weights, and the rest without decay."""
    keywords = tuple(keywords)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p, keywords) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; raises if the model has no trainable parameter."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


@dataclass
class LRSchedule:
    """Learning rate as a function of the optimizer step.

    - "cosine":       linear warm-up from 0 over `warmup_steps`, then half-cosine from `base_lr`
                      to `min_lr` at `total_steps` (tokenizer stages).
    - "constant":     linear warm-up, then `base_lr`.
    - "const_linear": `base_lr` until `hold_steps`, then linear to `min_lr` at `total_steps`, then
                      `min_lr` (the DiT^DH recipe: constant to epoch 40, linear to 2e-5 at 800).
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    hold_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if not (self.base_lr >= 0 and self.min_lr >= 0):
            raise ValueError(f"learning rates must be >= 0, got base {self.base_lr}, min {self.min_lr}")
        if self.total_steps < 1 or self.warmup_steps < 0 or self.hold_steps < 0:
            raise ValueError(
                f"schedule lengths must be total >= 1, warmup >= 0, hold >= 0; got "
                f"{self.total_steps}, {self.warmup_steps}, {self.hold_steps}"
            )

    def __call__(self, step: int) -> float:
        if self.kind == "const_linear":
            if step <= self.hold_steps:
                return self.base_lr
            span = max(self.total_steps - self.hold_steps, 1)
            frac = min((step - self.hold_steps) / span, 1.0)
            return self.base_lr - (self.base_lr - self.min_lr) * frac
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (scaled by an optional per-group "lr_scale")."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total L2 norm of the gradients *before* clipping (float32 scalar tensor); clips in place when
    max_norm > 0. Non-finite norms are returned as they are (the caller skips such steps)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None).float()
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None).float()
