"""Exponential moving average of a model's parameters, kept in float32.

ema <- decay * ema + (1 - decay) * param after every optimizer step, for trainable
parameters; frozen parameters and buffers are copied as they are (the release's
SimpleEMAModel does the same for frozen parameters). Keeping the average in float32
matters with decays such as 0.9995: (1 - decay) * param is below bf16's resolution.
Built after FSDP2 sharding, the averages are DTensors sharded like the parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """EMA(model, decay); update(model) after each optimizer step; state_dict() is model-shaped."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged, targets, copied = [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                averaged.append(self.params[name])
                targets.append(p.detach().float())
            else:
                copied.append((name, p))
        if averaged:
            torch._foreach_lerp_(averaged, targets, 1.0 - self.decay)
        for name, p in copied:
            self.params[name].copy_(p.detach())
        for name, b in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (cast to its dtypes)."""
        for name, p in model.named_parameters():
            p.copy_(self.params[name])
        for name, b in model.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "params": dict(self.params),
            "buffers": dict(self.buffers),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = (set(self.params) - set(state["params"])) | (set(self.buffers) - set(state["buffers"]))
        unexpected = (set(state["params"]) - set(self.params)) | (set(state["buffers"]) - set(self.buffers))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for name, value in state["params"].items():
            target = self.params[name]
            if hasattr(target, "device_mesh"):  # FSDP2-sharded average: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
            target.copy_(value)
        for name, value in state["buffers"].items():
            self.buffers[name].copy_(value)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
