"""Flash attention (FA2-style online softmax) with RoPE fused into the q/k tile loads.

Reads q, k, v straight from the packed projection qkv [B, L, 3*H*D] (laid out (3, H, D) on
the last axis), applies RoPE to each q/k tile as it is loaded, and writes the output as
[B, L, H*D], so there is neither a RoPE pass nor a permute copy. Non-causal, no dropout.
The forward saves the row logsumexp; the backward recomputes the RoPE'd tiles and the
probabilities, and writes d_qkv in the packed layout, with the RoPE transpose applied.

Head dims that are not powers of two (48, 72) are padded to the next power of two with
masks. Whether this beats "fused RoPE + SDPA" is for the GPU benchmark to decide (see
KERNELS.md); `rope_attention` in attention.py picks the backend.
"""

from __future__ import annotations

import math

import torch

from .backend import interpreter_active
from .rope import load_rope, load_table, table_strides, unit_last_stride
from .triton_utils import cast_to, tl, triton
from .triton_utils import jit as _jit


@_jit
def dot_operand(x, INTERPRET: tl.constexpr):
    # The interpreter's tl.dot gives garbage for bf16 operands (numpy has no bf16); the
    # values are already rounded to the input dtype, so fp32 there computes the same thing.
    if INTERPRET:
        return x.to(tl.float32)
    return x


@_jit
def load_tile(
    qkv_ptr, tab_ptr, col0, offs_l, offs_d, L, D, stride_pl, stride_tl,
    ROPE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows offs_l of the channels [col0, col0 + D) of one sample's qkv, RoPE'd when ROPE, as a
    dot operand. qkv_ptr and tab_ptr point at the sample already.

    RoPE runs in fp32 and the result is rounded to the input dtype, as the unfused
    rope_qkv + SDPA path does.
    """
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    rows = qkv_ptr + offs_l * stride_pl + col0
    if ROPE:
        cos, sin = load_table(tab_ptr, offs_l, offs_d, mask, stride_tl, D, False)
        x = cast_to(load_rope(rows, offs_d, mask, cos, sin, False), qkv_ptr.dtype.element_ty, INTERPRET)
    else:
        x = tl.load(rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return dot_operand(x, INTERPRET)


@_jit
def store_grad_tile(
    dqkv_ptr, tab_ptr, grad, col0, offs_l, offs_d, L, D, stride_dl, stride_tl,
    ROPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Write an fp32 gradient tile into d_qkv, through the RoPE transpose when ROPE."""
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    if ROPE:  # dx = g cos + rotate_half^T(g sin), the partner taken in registers here
        cos, sin = load_table(tab_ptr, offs_l, offs_d, mask, stride_tl, D, False)
        even, odd = tl.split(tl.reshape(grad * sin, (ROWS, BLOCK_D // 2, 2)))
        grad = grad * cos + tl.reshape(tl.join(odd, -even), (ROWS, BLOCK_D))  # (y0, y1) -> (y1, -y0)
    ptrs = dqkv_ptr + offs_l[:, None] * stride_dl + col0 + offs_d[None, :]
    tl.store(ptrs, cast_to(grad, dqkv_ptr.dtype.element_ty, INTERPRET), mask=mask)


@_jit
def _attn_fwd_kernel(
    qkv_ptr, tab_ptr, out_ptr, lse_ptr, sm_scale, H, L, D,
    stride_pb, stride_pl, stride_tb, stride_tl, stride_ob, stride_ol,
    INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    qkv_ptr += b * stride_pb  # this sample's rows
    tab_ptr += b * stride_tb  # stride_tb is 0 for a table shared by the batch
    # Scores in log2 units (exp2 is the native instruction); lse is saved in the same units.
    qk_scale = tl.cast(sm_scale, tl.float32) * 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(qkv_ptr, tab_ptr, h * D, offs_m, offs_d, L, D, stride_pl, stride_tl,
                  True, INTERPRET)  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(qkv_ptr, tab_ptr, (H + h) * D, offs_n, offs_d, L, D, stride_pl, stride_tl,
                      True, INTERPRET)  # fmt: skip
        v = load_tile(qkv_ptr, tab_ptr, (2 * H + h) * D, offs_n, offs_d, L, D, stride_pl, stride_tl,
                      False, INTERPRET)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (M, N)
        s = tl.where(offs_n[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = dot_operand(cast_to(p, qkv_ptr.dtype.element_ty, INTERPRET), INTERPRET)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    out_ptrs = out_ptr + b * stride_ob + offs_m[:, None] * stride_ol + h * D + offs_d[None, :]
    tl.store(out_ptrs, cast_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(lse_ptr + pid_bh * L + offs_m, m_i + tl.log2(l_i), mask=offs_m < L)


@_jit
def _attn_bwd_delta_kernel(
    out_ptr, do_ptr, delta_ptr, H, L, D, stride_ob, stride_ol, stride_gb, stride_gl,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) per (b, h, row): the softmax-backward term shared by dq and dk."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    cols = h * D + offs_d[None, :]
    o = tl.load(out_ptr + b * stride_ob + offs_m[:, None] * stride_ol + cols, mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_gb + offs_m[:, None] * stride_gl + cols, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * L + offs_m, delta, mask=offs_m < L)


@_jit
def load_row_stats(
    do_ptr, lse_ptr, delta_ptr, col0, offs_m, offs_d, L, D, stride_gl, INTERPRET: tl.constexpr
):
    """dO tile (as a dot operand), lse and delta for query rows offs_m of one (sample, head)."""
    row_ok = offs_m < L
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    do = tl.load(do_ptr + offs_m[:, None] * stride_gl + col0 + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
    return dot_operand(do, INTERPRET), lse, delta


@_jit
def _attn_bwd_dkdv_kernel(
    qkv_ptr, tab_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, sm_scale, H, L, D,
    stride_pb, stride_pl, stride_tb, stride_tl, stride_gb, stride_gl, stride_db, stride_dl,
    INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One key block: dv = P^T dO and dk = dS^T q over all query blocks; writes d_qkv's k, v parts."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    qkv_ptr += b * stride_pb
    tab_ptr += b * stride_tb
    do_ptr += b * stride_gb
    dqkv_ptr += b * stride_db
    lse_ptr += pid_bh * L
    delta_ptr += pid_bh * L
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dtype = qkv_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(qkv_ptr, tab_ptr, (H + h) * D, offs_n, offs_d, L, D, stride_pl, stride_tl,
                  True, INTERPRET)  # fmt: skip
    v = load_tile(qkv_ptr, tab_ptr, (2 * H + h) * D, offs_n, offs_d, L, D, stride_pl, stride_tl,
                  False, INTERPRET)  # fmt: skip

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(qkv_ptr, tab_ptr, h * D, offs_m, offs_d, L, D, stride_pl, stride_tl,
                      True, INTERPRET)  # fmt: skip
        do, lse, delta = load_row_stats(
            do_ptr, lse_ptr, delta_ptr, h * D, offs_m, offs_d, L, D, stride_gl, INTERPRET
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (M, N)
        p = tl.where(offs_m[:, None] < L, tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(
            tl.trans(dot_operand(cast_to(p, dtype, INTERPRET), INTERPRET)), do, input_precision=DOT_PREC
        )
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = dot_operand(cast_to(p * (dp - delta[:, None]), dtype, INTERPRET), INTERPRET)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)

    store_grad_tile(dqkv_ptr, tab_ptr, dk * sm_scale, (H + h) * D, offs_n, offs_d, L, D, stride_dl, stride_tl,
                    True, BLOCK_N, BLOCK_D, INTERPRET)  # fmt: skip
    store_grad_tile(dqkv_ptr, tab_ptr, dv, (2 * H + h) * D, offs_n, offs_d, L, D, stride_dl, stride_tl,
                    False, BLOCK_N, BLOCK_D, INTERPRET)  # fmt: skip


@_jit
def _attn_bwd_dq_kernel(
    qkv_ptr, tab_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, sm_scale, H, L, D,
    stride_pb, stride_pl, stride_tb, stride_tl, stride_gb, stride_gl, stride_db, stride_dl,
    INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One query block: dq = dS k over all key blocks; writes d_qkv's q part (no atomics needed)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    qkv_ptr += b * stride_pb
    tab_ptr += b * stride_tb
    do_ptr += b * stride_gb
    dqkv_ptr += b * stride_db
    lse_ptr += pid_bh * L
    delta_ptr += pid_bh * L
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dtype = qkv_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(qkv_ptr, tab_ptr, h * D, offs_m, offs_d, L, D, stride_pl, stride_tl,
                  True, INTERPRET)  # fmt: skip
    do, lse, delta = load_row_stats(
        do_ptr, lse_ptr, delta_ptr, h * D, offs_m, offs_d, L, D, stride_gl, INTERPRET
    )

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(qkv_ptr, tab_ptr, (H + h) * D, offs_n, offs_d, L, D, stride_pl, stride_tl,
                      True, INTERPRET)  # fmt: skip
        v = load_tile(qkv_ptr, tab_ptr, (2 * H + h) * D, offs_n, offs_d, L, D, stride_pl, stride_tl,
                      False, INTERPRET)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (M, N)
        p = tl.where(offs_n[None, :] < L, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = dot_operand(cast_to(p * (dp - delta[:, None]), dtype, INTERPRET), INTERPRET)
        dq += tl.dot(ds, k, input_precision=DOT_PREC)

    store_grad_tile(dqkv_ptr, tab_ptr, dq * sm_scale, h * D, offs_m, offs_d, L, D, stride_dl, stride_tl,
                    True, BLOCK_M, BLOCK_D, INTERPRET)  # fmt: skip


# ----------------------------------------------------------------------------- launchers


# GPU tiles (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages) per kernel and padded
# head dim, for 16-bit inputs: the largest tried that ptxas compiles without register spills on
# sm_90 (the fp32 cos/sin tiles loaded beside each q/k tile cost registers). Not yet timed.
_GPU_TILES = {
    ("fwd", 64): (128, 64, 8, 2),
    ("fwd", 128): (64, 32, 8, 2),
    ("dkdv", 64): (32, 64, 8, 2),
    ("dkdv", 128): (32, 32, 8, 1),
    ("dq", 64): (32, 64, 8, 2),
    ("dq", 128): (32, 32, 8, 1),
}


def _config(kernel: str, block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch parameters. The interpreter uses 16-wide tiles: quick, and short test sequences
    still span several blocks."""
    if interpreter_active():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # fp32 is for tests: the small tiles, one stage (A100's shared memory)
        m, n, warps, _ = _GPU_TILES[kernel, 128]
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=1)
    m, n, warps, stages = _GPU_TILES[kernel, max(block_d, 64)]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def _dot_precision(qkv: torch.Tensor) -> str:
    # fp32 inputs get true fp32 products (tf32 would cost ~1e-3 relative); for 16-bit inputs
    # the setting has no effect and "tf32" is Triton's default.
    return "ieee" if qkv.dtype == torch.float32 else "tf32"


def _forward(qkv: torch.Tensor, table: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    qkv, table = unit_last_stride(qkv), unit_last_stride(table)
    B, L, three_hd = qkv.shape
    H, D = num_heads, three_hd // (3 * num_heads)
    out = qkv.new_empty((B, L, H * D))
    lse = qkv.new_empty((B, H, L), dtype=torch.float32)  # log2 units
    block_d = max(triton.next_power_of_2(D), 16)  # tl.dot needs K >= 16
    cfg = _config("fwd", block_d, qkv.dtype)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        qkv, table, out, lse, 1.0 / math.sqrt(D), H, L, D,
        qkv.stride(0), qkv.stride(1), *table_strides(table), out.stride(0), out.stride(1),
        INTERPRET=interpreter_active(), DOT_PREC=_dot_precision(qkv), BLOCK_D=block_d, **cfg,
    )  # fmt: skip
    return out, lse


def _backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    grad_out, qkv, table = unit_last_stride(grad_out), unit_last_stride(qkv), unit_last_stride(table)
    B, L, three_hd = qkv.shape
    H, D = num_heads, three_hd // (3 * num_heads)
    block_d = max(triton.next_power_of_2(D), 16)
    consts = dict(INTERPRET=interpreter_active(), DOT_PREC=_dot_precision(qkv), BLOCK_D=block_d)

    delta = torch.empty((B, H, L), dtype=torch.float32, device=qkv.device)
    _attn_bwd_delta_kernel[(triton.cdiv(L, 32), B * H)](
        out, grad_out, delta, H, L, D, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        BLOCK_M=32, BLOCK_D=block_d,
    )  # fmt: skip

    d_qkv = qkv.new_empty(qkv.shape)  # contiguous; every element is written below
    args = (
        qkv, table, grad_out, lse, delta, d_qkv, 1.0 / math.sqrt(D), H, L, D,
        qkv.stride(0), qkv.stride(1), *table_strides(table), grad_out.stride(0), grad_out.stride(1),
        d_qkv.stride(0), d_qkv.stride(1),
    )  # fmt: skip
    cfg = _config("dkdv", block_d, qkv.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](*args, **consts, **cfg)
    cfg = _config("dq", block_d, qkv.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](*args, **consts, **cfg)
    return d_qkv


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("rectok::flash_rope_attention", mutates_args=())
def _flash_op(qkv: torch.Tensor, table: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(qkv, table, num_heads)


@_flash_op.register_fake
def _(qkv: torch.Tensor, table: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, three_hd = qkv.shape
    return qkv.new_empty((B, L, three_hd // 3)), qkv.new_empty((B, num_heads, L), dtype=torch.float32)


@torch.library.custom_op("rectok::flash_rope_attention_backward", mutates_args=())
def _flash_backward_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    return _backward(grad_out, qkv, table, out, lse, num_heads)


@_flash_backward_op.register_fake
def _(grad_out, qkv, table, out, lse, num_heads):
    return qkv.new_empty(qkv.shape)


def _flash_setup(ctx, inputs, output) -> None:
    qkv, table, num_heads = inputs
    out, lse = output
    ctx.save_for_backward(qkv, table, out, lse)
    ctx.num_heads = num_heads


def _flash_grad(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
    qkv, table, out, lse = ctx.saved_tensors
    # lse is an internal by-product returned only so that it can be saved: no gradient flows through it.
    return _flash_backward_op(grad_out, qkv, table, out, lse, ctx.num_heads), None, None


_flash_op.register_autograd(_flash_grad, setup_context=_flash_setup)


def flash_rope_attention(qkv: torch.Tensor, table: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with RoPE on q, k, as one Triton kernel per pass.

    qkv [B, L, 3*H*D] laid out (3, H, D), table [L, 2D] or [B, L, 2D] -> [B, L, H*D].
    Shapes are checked by the caller (`rope_attention`).
    """
    return _flash_op(qkv, table, num_heads)[0]
