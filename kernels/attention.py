"""Multi-head self-attention with RoPE on q and k, from a packed qkv projection.

Backends of `rope_attention`:
- "sdpa":       rope_qkv (fused Triton split + RoPE, or the reference) + F.scaled_dot_product_attention.
- "triton":     our flash attention with RoPE fused into the q/k tile loads (flash_attention.py).
- "flash_attn": rope_qkv + flash_attn.flash_attn_func (optional package, CUDA, fp16/bf16).
- "xformers":   rope_qkv + xformers.ops.memory_efficient_attention (optional package).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F

from .backend import interpreter_active
from .flash_attention import flash_rope_attention
from .rope import check_packed_qkv, rope_qkv, rope_qkv_reference, triton

ATTENTION_BACKENDS = ("sdpa", "triton", "flash_attn", "xformers")
_PIP_NAMES = {
    "flash_attn": "flash-attn (pip install 'rectok[flash]')",
    "xformers": "xformers (pip install 'rectok[xformers]')",
}


def rope_attention_reference(qkv: torch.Tensor, table: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, L, _ = qkv.shape
    q, k, v = rope_qkv_reference(qkv, table, num_heads)
    o = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
    return o.transpose(1, 2).reshape(B, L, -1)


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _require_package(backend: str) -> None:
    if not _installed(backend):
        raise ImportError(
            f"attention backend {backend!r} was requested but {backend} is not installed: install "
            f"{_PIP_NAMES[backend]}, or use backend='sdpa' or 'triton'"
        )


def _require_triton_runnable(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(
            "attention backend 'triton' was requested but triton is not installed (pip install triton)"
        )
    if not all(t.is_cuda for t in tensors) and not interpreter_active():
        raise RuntimeError(
            "attention backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before Python starts, or use backend='sdpa'"
        )


def _rope_qkv_blhd(qkv: torch.Tensor, table: torch.Tensor, num_heads: int, backend: str):
    """q, k, v as [B, L, H, D] views (unit stride on D), the layout flash_attn and xformers take."""
    if not qkv.is_cuda or qkv.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend {backend!r} needs fp16/bf16 CUDA tensors; got {qkv.dtype} on {qkv.device}"
        )
    return tuple(t.transpose(1, 2) for t in rope_qkv(qkv, table, num_heads))


def rope_attention(
    qkv: torch.Tensor, table: torch.Tensor, num_heads: int, backend: str | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with RoPE on q, k; qkv [B, L, 3*H*D] -> [B, L, H*D]. Non-causal.

    backend: one of ATTENTION_BACKENDS, or None for the default ("sdpa"; its RoPE runs the
    Triton kernel or the PyTorch reference as `use_backend` decides).
    """
    check_packed_qkv(qkv, table, num_heads)
    B, L, three_hd = qkv.shape
    if backend is None:
        # Default "sdpa": KERNELS.md notes that a Triton attention with RoPE fused into the q/k
        # loads measured slower than fused RoPE + SDPA on A100, and no GPU benchmark here has
        # shown otherwise yet. On CPU with the reference kernels this is exactly the reference.
        backend = "sdpa"
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )

    if backend == "triton":
        _require_triton_runnable(qkv, table)
        return flash_rope_attention(qkv, table, num_heads)
    if backend == "sdpa":
        q, k, v = rope_qkv(qkv, table, num_heads)  # each (B, H, L, D)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(B, L, three_hd // 3)
    _require_package(backend)
    q, k, v = _rope_qkv_blhd(qkv, table, num_heads, backend)  # each (B, L, H, D)
    if backend == "flash_attn":
        flash_attn = importlib.import_module("flash_attn")
        o = flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, causal=False)
    else:
        xops = importlib.import_module("xformers.ops")
        o = xops.memory_efficient_attention(q, k, v)
    return o.reshape(B, L, three_hd // 3)
