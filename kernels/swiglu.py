"""SwiGLU gate: silu(a) * b for a, b = h.chunk(2, -1).

Layers, bottom up: Triton forward/backward kernels, host launchers (flatten to rows x 2H),
a `torch.library` op with fake and autograd registrations (kept whole by
`torch.compile(fullgraph=True)`), the functional API, and the pure-PyTorch reference.

The backward recomputes silu from h (saved by the forward) instead of saving the gate: one
read of h and dy, one write of dh = [da | db] into a single tensor laid out like h, so the
matmul that produced h gets its gradient without a concatenation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import use_triton
from .triton_utils import jit, store_cast, tl, triton


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    a, b = h.float().chunk(2, -1)
    return (F.silu(a) * b).to(h.dtype)


# ----------------------------------------------------------------------------- kernels


@jit
def _swiglu_fwd_kernel(Hp, Y, stride_h, stride_y, H, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Program (row, j) handles columns [j * BLOCK, (j + 1) * BLOCK) of one row; a = h[:H], b = h[H:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    a = tl.load(Hp + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Hp + row * stride_h + H + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    store_cast(Y + row * stride_y + cols, y, mask, EMULATE_RNE)


@jit
def _swiglu_bwd_kernel(
    DY, Hp, DH, stride_dy, stride_h, stride_dh, H, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr
):
    """With s = sigmoid(a):  db = dy * a * s,  da = dy * b * s * (1 + a * (1 - s))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(Hp + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Hp + row * stride_h + H + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    da = dy * b * (s + silu * (1.0 - s))
    db = dy * silu
    store_cast(DH + row * stride_dh + cols, da, mask, EMULATE_RNE)
    store_cast(DH + row * stride_dh + H + cols, db, mask, EMULATE_RNE)


# ----------------------------------------------------------------------------- launchers


def _grid_and_meta(M: int, H: int, device: torch.device) -> tuple[tuple[int, int], dict]:
    """Elementwise, so rows are tiled in column blocks of at most 1024 (masked at the end): an odd
    hidden width such as 5461 wastes part of one block per row instead of a third of an 8192 block."""
    block = min(triton.next_power_of_2(H), 1024)
    meta = dict(BLOCK=block, num_warps=4 if block >= 512 else 2, EMULATE_RNE=device.type != "cuda")
    return (M, triton.cdiv(H, block)), meta


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., W] -> [M, W] with unit stride on W (a view when possible, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    H = h.shape[-1] // 2
    h2 = _rows(h)  # (M, 2H)
    M = h2.shape[0]
    y = torch.empty((*h.shape[:-1], H), dtype=h.dtype, device=h.device)
    grid, meta = _grid_and_meta(M, H, h.device)
    _swiglu_fwd_kernel[grid](h2, y, h2.stride(0), H, H, **meta)
    return y


def _swiglu_bwd(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    H = h.shape[-1] // 2
    h2, dy2 = _rows(h), _rows(dy)  # (M, 2H), (M, H)
    M = h2.shape[0]
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    grid, meta = _grid_and_meta(M, H, h.device)
    _swiglu_bwd_kernel[grid](dy2, h2, dh, dy2.stride(0), h2.stride(0), 2 * H, H, **meta)
    return dh


# ----------------------------------------------------------------------------- torch.library op
# custom_op (not triton_op): its body runs the launcher as an opaque call, which works eagerly and
# under torch.compile(fullgraph=True) both on GPUs and with Triton's CPU interpreter.


@torch.library.custom_op("rectok::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(h: torch.Tensor) -> torch.Tensor:
    return _swiglu_fwd(h)


@_swiglu_fwd_op.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("rectok::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return _swiglu_bwd(dy, h)


@_swiglu_bwd_op.register_fake
def _(dy, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, dy):
    (h,) = ctx.saved_tensors
    return _swiglu_bwd_op(dy, h)


_swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


# ----------------------------------------------------------------------------- functional API


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2H] -> [..., H]."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {h.shape[-1]} must be even")
    if use_triton(h, op="swiglu"):
        return _swiglu_fwd_op(h)
    return swiglu_reference(h)
