"""Transformer building blocks shared by the tokenizer and DiT^DH (SPEC section 2).

Pre-norm block `x = x + Attn(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x))` with 2-D RoPE
on q and k. Every fused op goes through the functional API of `rectok.kernels`, so
the backend (Triton or PyTorch reference) is chosen in one place.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from rectok import kernels


def mlp_hidden_dim(dim: int) -> int:
    """SwiGLU hidden width of the official release: int(2/3 * 4 * dim) (2048 at dim 768)."""
    return int(2 / 3 * 4 * dim)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight; statistics in float32 (see kernels.rms_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLUMLP(nn.Module):
    """w3(silu(a) * b) with a, b = w12(x).chunk(2, -1)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(kernels.swiglu(self.w12(x)))


class Attention(nn.Module):
    """Multi-head self-attention, qkv packed as (3, heads, head_dim), RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope_table: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], rope_table [L, 2*head_dim] or [B, L, 2*head_dim] -> [B, L, dim]."""
        o = kernels.rope_attention(self.qkv(x), rope_table, self.num_heads)
        return self.proj(o)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm -> RoPE attention, RMSNorm -> SwiGLU, both residual."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int | None = None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLUMLP(dim, mlp_hidden if mlp_hidden is not None else mlp_hidden_dim(dim))

    def forward(self, x: torch.Tensor, rope_table: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] -> [B, L, dim]."""
        x = x + self.attn(self.norm1(x), rope_table)
        return x + self.mlp(self.norm2(x))


def run_block(block: nn.Module, checkpointing: bool, *args: torch.Tensor) -> torch.Tensor:
    """block(*args), with activation checkpointing when `checkpointing` and autograd is recording:
    only the block's inputs are kept for backward and its forward runs again there (no random
    draws inside a block, so the recomputation is exact)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing per transformer block on or off in every module of `model` that
    supports it (the tokenizer's trunks, DiT^DH); returns how many modules it set. State-dict names
    are unchanged, and it composes with torch.compile (checkpointing traces), DDP and FSDP."""
    found = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    for m in found:
        m.activation_checkpointing = enabled
    return len(found)
