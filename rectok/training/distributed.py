"""torchrun / SLURM / DDP / FSDP helpers.

`init_distributed` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so one node or many run the same code: NCCL on GPUs, gloo
on CPU. Started by `srun python train.py ...` instead (one SLURM task per GPU, no
torchrun), it derives those variables from SLURM's first (slurm.py). Without
either, everything is a single process and the collectives below are no-ops. Wrappers
are applied from outside the model code (`wrap_ddp`, `shard_fsdp`, `torch.compile`), and
`unwrap` peels them off again so that saved state dicts carry no `module.` / `_orig_mod.`
prefixes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rectok.training.slurm import slurm_environment


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICES = ("auto", "cpu", "cuda")


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Start the process group when launched by torchrun or by srun; pick this rank's device.

    device: "auto" (this rank's GPU if CUDA is available, else CPU), "cuda" or "cpu". Under srun
    without torchrun, torchrun's variables are derived from SLURM's and put into os.environ (the
    process group and the environment report read them there).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is visible (use --device cpu)")
    os.environ.update(slurm_environment(os.environ))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); identity in a single process."""
    if not dist.is_initialized():
        return value.clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return value.clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_reduce_sum_(value: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns `value`)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_ddp(module: nn.Module, info: DistInfo, **kwargs: Any) -> nn.Module:
    """DistributedDataParallel over this rank's device; the module itself when not distributed."""
    if not info.enabled:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def shard_fsdp(
    model: nn.Module, blocks: list[nn.Module], mixed_precision: torch.dtype | None = None
) -> nn.Module:
    """FSDP2: shard each block, then the root (parameters become DTensors, gathered per block).

    Gradients are reduced in float32; `mixed_precision` sets the compute dtype of the
    parameters (None keeps them as stored).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_fsdp(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain (unsharded, CPU) state dict on every rank, for DDP, FSDP2 or plain modules."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a DTensor (FSDP2 shard) into a full tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
