"""Rotary position embedding on interleaved channel pairs, and the fused qkv split + RoPE.

RoPE here is `x * cos + rotate_half(x) * sin` with a table [L, 2D] (or [B, L, 2D] per sample,
after MAE masking) = [cos | sin]. The tokenizer's table gives adjacent channels different
angles (SPEC section 2), so the map is not a rotation and its transpose is not the inverse
rotation: the backward is dx = g * cos + rotate_half^T(g * sin), with rotate_half^T taking
(y0, y1, y2, y3, ...) -> (y1, -y0, y3, -y2, ...).

Layers: Triton kernels + launchers, `torch.library` ops (so `torch.compile(fullgraph=True)`
keeps them whole), the functional API (`apply_rope`, `rope_qkv`) and the references.
"""

from __future__ import annotations

import torch

from .backend import interpreter_active, use_triton
from .triton_utils import cast_to, tl, triton
from .triton_utils import jit as _jit

# Tile of one program: rows x padded head dim, ~2048 elements on the GPU (16 per thread at
# 4 warps, for each of x, its pair, cos and sin). The interpreter runs each program in
# numpy; 16 rows keep the tests quick and still leave most test lengths ragged.
_TILE_ELEMS_GPU = 2048
_BLOCK_L_INTERPRET = 16
# Heads handled by one program: the table tile (fp32 cos and sin, 4x the bytes of a bf16
# head tile) is loaded once and reused across them, while small batches still get
# enough programs to fill the GPU.
_HEADS_PER_PROG = 4


# ----------------------------------------------------------------------------- references


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last axis (SPEC section 2)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _table_for(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, D] or [B, L, D] -> broadcastable against x [B, H, L, D]."""
    D = x.shape[-1]
    cos, sin = table[..., :D].float(), table[..., D:].float()
    if table.ndim == 3:  # per-sample table (MAE-masked tokens): [B, L, 2D] -> [B, 1, L, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def apply_rope_reference(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    cos, sin = _table_for(x, table)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rope_qkv_reference(
    qkv: torch.Tensor, table: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, three_hd = qkv.shape
    D = three_hd // (3 * num_heads)
    q, k, v = qkv.view(B, L, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    return apply_rope_reference(q, table), apply_rope_reference(k, table), v


# ----------------------------------------------------------------------------- Triton kernels


# rotate_half takes each channel's pair partner (channel d ^ 1). The kernels fetch it with a
# second, pair-swapped load of the same tile (an L1 hit) instead of shuffling registers:
# ptxas showed the register form (reshape/split/join) needing far more registers.


@_jit
def load_table(tab_ptr, offs_l, offs_d, mask, stride_tl, D, BACKWARD: tl.constexpr):
    """fp32 tiles [rows, BLOCK_D] of cos at channel d, and of sin at d (forward) or at the
    pair partner d ^ 1 (backward, for the transpose). tab_ptr points at this sample's table."""
    rows = tab_ptr + offs_l[:, None] * stride_tl
    cos = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin_d = (offs_d ^ 1) if BACKWARD else offs_d
    sin = tl.load(rows + D + sin_d[None, :], mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@_jit
def load_rope(rows, offs_d, mask, cos, sin, BACKWARD: tl.constexpr):
    """RoPE in fp32 of the tile rows[:, None] + offs_d, or its transpose when BACKWARD.

    forward:  y[d] = x[d] cos[d] + s[d] x[d^1] sin[d],    s = (-1, +1, -1, ...)
    backward: y[d] = x[d] cos[d] - s[d] x[d^1] sin[d^1]   (rotate_half^T = -rotate_half)
    Padded channels load cos = sin = 0 and come out as 0; D is even, so pairs never straddle
    the padding.
    """
    x = tl.load(rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_pair = tl.load(rows[:, None] + (offs_d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
    even = (offs_d % 2 == 0)[None, :]
    if BACKWARD:
        return x * cos + tl.where(even, x_pair, -x_pair) * sin
    return x * cos + tl.where(even, -x_pair, x_pair) * sin


@_jit
def _apply_rope_kernel(
    x_ptr,  # [B, H, L, D], unit stride on D
    y_ptr,  # [B, H, L, D] contiguous
    tab_ptr,
    H,
    L,
    D,
    stride_xb,
    stride_xh,
    stride_xl,
    stride_tb,
    stride_tl,
    BACKWARD: tl.constexpr,
    INTERPRET: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_l, b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    cos, sin = load_table(tab_ptr + b * stride_tb, offs_l, offs_d, mask, stride_tl, D, BACKWARD)
    for i in range(HEADS_PER_PROG):  # a loop, not unrolled: one head's tiles live at a time
        h = pid_h * HEADS_PER_PROG + i
        mask_h = mask & (h < H)
        y = load_rope(
            x_ptr + b * stride_xb + h * stride_xh + offs_l * stride_xl, offs_d, mask_h, cos, sin, BACKWARD
        )
        y_ptrs = y_ptr + ((b * H + h) * L + offs_l[:, None]) * D + offs_d[None, :]
        tl.store(y_ptrs, cast_to(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask_h)


@_jit
def _rope_qkv_kernel(
    qkv_ptr,  # [B, L, 3*H*D] laid out (3, H, D) on the last axis, unit stride there
    q_ptr,  # q, k, v: [B, H, L, D], contiguous
    k_ptr,
    v_ptr,
    tab_ptr,
    H,
    L,
    D,
    stride_pb,
    stride_pl,
    stride_tb,
    stride_tl,
    BACKWARD: tl.constexpr,
    INTERPRET: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Forward: packed qkv -> RoPE'd q, k and v. Backward: dq, dk, dv -> packed d_qkv."""
    pid_l, b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    cos, sin = load_table(tab_ptr + b * stride_tb, offs_l, offs_d, mask, stride_tl, D, BACKWARD)
    for i in range(HEADS_PER_PROG):  # a loop, not unrolled: one head's tiles live at a time
        h = pid_h * HEADS_PER_PROG + i
        mask_h = mask & (h < H)
        packed = qkv_ptr + b * stride_pb + offs_l * stride_pl + h * D  # (BLOCK_L,) row starts of q
        split = (b * H + h) * L * D + offs_l * D  # (BLOCK_L,) row starts in q, k, v
        tile = offs_d[None, :]
        if BACKWARD:
            out_ty = qkv_ptr.dtype.element_ty
            dq = load_rope(q_ptr + split, offs_d, mask_h, cos, sin, True)
            dk = load_rope(k_ptr + split, offs_d, mask_h, cos, sin, True)
            dv = tl.load(v_ptr + split[:, None] + tile, mask=mask_h, other=0.0)
            tl.store(packed[:, None] + tile, cast_to(dq, out_ty, INTERPRET), mask=mask_h)
            tl.store(packed[:, None] + H * D + tile, cast_to(dk, out_ty, INTERPRET), mask=mask_h)
            tl.store(packed[:, None] + 2 * H * D + tile, dv.to(out_ty), mask=mask_h)
        else:
            out_ty = q_ptr.dtype.element_ty
            q = load_rope(packed, offs_d, mask_h, cos, sin, False)
            k = load_rope(packed + H * D, offs_d, mask_h, cos, sin, False)
            v = tl.load(packed[:, None] + 2 * H * D + tile, mask=mask_h, other=0.0)
            tl.store(q_ptr + split[:, None] + tile, cast_to(q, out_ty, INTERPRET), mask=mask_h)
            tl.store(k_ptr + split[:, None] + tile, cast_to(k, out_ty, INTERPRET), mask=mask_h)
            tl.store(v_ptr + split[:, None] + tile, v.to(out_ty), mask=mask_h)


# ----------------------------------------------------------------------------- launchers


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last axis with unit stride; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a [L, 2D] (batch stride 0: shared) or [B, L, 2D] table."""
    return (table.stride(0), table.stride(1)) if table.ndim == 3 else (0, table.stride(0))


def _tiles(D: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_D) for head dim D; BLOCK_D pads D to a power of two (masked)."""
    block_d = max(triton.next_power_of_2(D), 2)
    return (_BLOCK_L_INTERPRET if interpreter_active() else max(_TILE_ELEMS_GPU // block_d, 1)), block_d


def _launch_apply_rope(x: torch.Tensor, table: torch.Tensor, backward: bool) -> torch.Tensor:
    x, table = unit_last_stride(x), unit_last_stride(table)
    B, H, L, D = x.shape
    y = torch.empty((B, H, L, D), dtype=x.dtype, device=x.device)
    block_l, block_d = _tiles(D)
    grid = (triton.cdiv(L, block_l), B, triton.cdiv(H, _HEADS_PER_PROG))
    _apply_rope_kernel[grid](
        x, y, table, H, L, D, x.stride(0), x.stride(1), x.stride(2), *table_strides(table),
        BACKWARD=backward, INTERPRET=interpreter_active(), HEADS_PER_PROG=_HEADS_PER_PROG, BLOCK_L=block_l,
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return y


def _launch_rope_qkv(
    packed: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    backward: bool,
) -> None:
    B, H, L, D = q.shape
    block_l, block_d = _tiles(D)
    grid = (triton.cdiv(L, block_l), B, triton.cdiv(H, _HEADS_PER_PROG))
    _rope_qkv_kernel[grid](
        packed, q, k, v, table, H, L, D, packed.stride(0), packed.stride(1), *table_strides(table),
        BACKWARD=backward, INTERPRET=interpreter_active(), HEADS_PER_PROG=_HEADS_PER_PROG, BLOCK_L=block_l,
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("rectok::apply_rope", mutates_args=())
def _apply_rope_op(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _launch_apply_rope(x, table, backward=False)


@torch.library.custom_op("rectok::apply_rope_backward", mutates_args=())
def _apply_rope_backward_op(grad: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return _launch_apply_rope(grad, table, backward=True)


@_apply_rope_op.register_fake
@_apply_rope_backward_op.register_fake
def _(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _apply_rope_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _apply_rope_grad(ctx, grad: torch.Tensor):
    (table,) = ctx.saved_tensors
    return _apply_rope_backward_op(grad, table), None  # the table is a constant buffer


_apply_rope_op.register_autograd(_apply_rope_grad, setup_context=_apply_rope_setup)


@torch.library.custom_op("rectok::rope_qkv", mutates_args=())
def _rope_qkv_op(
    qkv: torch.Tensor, table: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, table = unit_last_stride(qkv), unit_last_stride(table)
    B, L, three_hd = qkv.shape
    q, k, v = (qkv.new_empty((B, num_heads, L, three_hd // (3 * num_heads))) for _ in range(3))
    _launch_rope_qkv(qkv, q, k, v, table, backward=False)
    return q, k, v


@_rope_qkv_op.register_fake
def _(
    qkv: torch.Tensor, table: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, three_hd = qkv.shape
    return tuple(qkv.new_empty((B, num_heads, L, three_hd // (3 * num_heads))) for _ in range(3))


@torch.library.custom_op("rectok::rope_qkv_backward", mutates_args=())
def _rope_qkv_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    dq, dk, dv, table = dq.contiguous(), dk.contiguous(), dv.contiguous(), unit_last_stride(table)
    B, H, L, D = dq.shape
    d_qkv = dq.new_empty((B, L, 3 * H * D))
    _launch_rope_qkv(d_qkv, dq, dk, dv, table, backward=True)
    return d_qkv


@_rope_qkv_backward_op.register_fake
def _(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    B, H, L, D = dq.shape
    return dq.new_empty((B, L, 3 * H * D))


def _rope_qkv_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _rope_qkv_grad(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
    (table,) = ctx.saved_tensors
    return _rope_qkv_backward_op(dq, dk, dv, table), None, None


_rope_qkv_op.register_autograd(_rope_qkv_grad, setup_context=_rope_qkv_setup)


# ----------------------------------------------------------------------------- functional API


def _check_table(B: int, L: int, D: int, table: torch.Tensor) -> None:
    if table.shape not in ((L, 2 * D), (B, L, 2 * D)):
        raise ValueError(
            f"RoPE table {tuple(table.shape)} does not fit [L, 2D] = [{L}, {2 * D}] or [B, L, 2D]"
        )


def _check_head_dim(D: int) -> None:
    if D % 2:
        raise ValueError(f"RoPE pairs interleaved channels, so the head dim must be even; got {D}")


def check_packed_qkv(qkv: torch.Tensor, table: torch.Tensor, num_heads: int) -> None:
    """Raise ValueError unless qkv is [B, L, 3*H*D] with even D and the table fits it."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"packed qkv {tuple(qkv.shape)} is not [B, L, 3 * {num_heads} heads * head_dim]")
    B, L, three_hd = qkv.shape
    _check_head_dim(three_hd // (3 * num_heads))
    _check_table(B, L, three_hd // (3 * num_heads), table)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], table [L, 2D] or [B, L, 2D] = [cos | sin] -> x * cos + rotate_half(x) * sin."""
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x [B, H, L, D]; got shape {tuple(x.shape)}")
    _check_head_dim(x.shape[-1])
    _check_table(x.shape[0], x.shape[2], x.shape[3], table)
    if use_triton(x, table, op="apply_rope"):
        return _apply_rope_op(x, table)
    return apply_rope_reference(x, table)


def rope_qkv(
    qkv: torch.Tensor, table: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed projection [B, L, 3*H*D] laid out (3, H, D) -> q, k, v [B, H, L, D], RoPE on q and k.

    The Triton path reads qkv once and writes contiguous q, k, v (no permute copies).
    """
    check_packed_qkv(qkv, table, num_heads)
    if use_triton(qkv, table, op="rope_qkv"):
        return _rope_qkv_op(qkv, table, num_heads)
    return rope_qkv_reference(qkv, table, num_heads)
