"""RMSNorm and RMSNorm + adaLN modulation (the DiT^DH block pattern).

Layers, bottom up: Triton kernels, host launchers (flatten to rows x D, pick block and
warps), `torch.library` ops with fake and autograd registrations (so that
`torch.compile(fullgraph=True)` keeps them whole), the functional API, and the
pure-PyTorch references that define the semantics.

Numerics: statistics and all arithmetic in float32 whatever the storage dtype; the
forward saves rstd = 1 / sqrt(mean(x^2) + eps) per row in float32 for the backward.
Reductions over rows (dW, and the per-sample dshift / dscale of the modulated form) are
done in two stages -- each program sums its rows into one float32 partial row, then one
`sum` over the partials -- so there are no atomics and the result is deterministic.
"""

from __future__ import annotations

import functools

import torch

from .backend import use_triton
from .triton_utils import jit, store_cast, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Statistics in float32 whatever the input dtype (bf16 training stays stable).
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def rms_norm_modulate_reference(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    y = rms_norm_reference(x.float(), weight, eps)
    return (y * (1.0 + scale.float()) + shift.float()).to(x.dtype)


# ----------------------------------------------------------------------------- kernels


@jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr
):
    """One row per program: y = x * rstd * w."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    # eps arrives as a Python float (fp64 under Inductor); cast once so the math stays fp32.
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + tl.cast(eps, tl.float32))
    tl.store(RSTD + row, rstd)
    store_cast(Y + row * stride_y + cols, x * rstd * w, mask, EMULATE_RNE)


@jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, M, D, rows_per_prog,
    BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr,
):  # fmt: skip
    """A run of rows per program: dx per row, and this program's partial sum of dW.

    With xhat = x * rstd and g = dy * w:  dx = rstd * (g - xhat * mean(g * xhat)),  dW = sum_rows dy * xhat.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for row in range(row_start, row_end):
        r = tl.cast(row, tl.int64)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
        store_cast(DX + r * stride_dx + cols, dx, mask, EMULATE_RNE)
        dw += dy * xhat
    tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=mask)


@jit
def _rms_norm_modulate_fwd_kernel(
    X, W, SHIFT, SCALE, Y, RSTD,
    stride_xb, stride_xl, stride_shb, stride_shl, stride_scb, stride_scl,
    L, D, eps, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr,
):  # fmt: skip
    """One row (b, l) per program: y = x * rstd * w * (1 + scale[b, l']) + shift[b, l'].

    Per-sample shift/scale ([B, 1, D]) come in with a zero l-stride, so one kernel serves both layouts.
    Y and RSTD are contiguous [B * L, D] and [B * L].
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_shb + l * stride_shl + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scb + l * stride_scl + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + tl.cast(eps, tl.float32))
    tl.store(RSTD + row, rstd)
    y = x * rstd * w * (1.0 + scale) + shift
    store_cast(Y + row * D + cols, y, mask, EMULATE_RNE)


@jit
def _rms_norm_modulate_bwd_kernel(
    DY, X, W, SCALE, RSTD, DX, DW_PART, DSCALE, DSHIFT_PART, DSCALE_PART,
    stride_dyb, stride_dyl, stride_xb, stride_xl, stride_scb, stride_scl,
    L, D, rows_per_prog, PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr,
):  # fmt: skip
    """Program (b, c) handles rows l in [c * rows_per_prog, (c + 1) * rows_per_prog) of sample b.

    n = xhat * w is the normalised row; y = n * (1 + scale) + shift, so dn = dy * (1 + scale) feeds the
    RMSNorm backward, dscale = dy * n and dshift = dy. Per-sample layout: dscale / dshift are summed over
    this program's rows into partials [B, C, D]; per-token layout: dscale is stored per row into DSCALE
    and dshift (= dy) is not computed here at all. dW partials are [B * C, D]. DX and DSCALE are contiguous.
    """
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    num_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK], dtype=tl.float32)
    if PER_SAMPLE:  # one scale row serves every l of this sample: load it once
        scale = tl.load(SCALE + b * stride_scb + cols, mask=mask, other=0.0).to(tl.float32)
    l_start = c * rows_per_prog
    l_end = tl.minimum(l_start + rows_per_prog, L)
    for l_idx in range(l_start, l_end):
        l = tl.cast(l_idx, tl.int64)
        row = b * L + l
        dy = tl.load(DY + b * stride_dyb + l * stride_dyl + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
        if not PER_SAMPLE:
            scale = tl.load(SCALE + b * stride_scb + l * stride_scl + cols, mask=mask, other=0.0).to(
                tl.float32
            )
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        dn = dy * (1.0 + scale)
        g = dn * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / D))
        store_cast(DX + row * D + cols, dx, mask, EMULATE_RNE)
        dw += dn * xhat
        if PER_SAMPLE:
            dscale_acc += dy * xhat * w
            dshift_acc += dy
        else:
            store_cast(DSCALE + row * D + cols, dy * xhat * w, mask, EMULATE_RNE)
    part = b * num_chunks + c
    tl.store(DW_PART + part * D + cols, dw, mask=mask)
    if PER_SAMPLE:
        tl.store(DSHIFT_PART + part * D + cols, dshift_acc, mask=mask)
        tl.store(DSCALE_PART + part * D + cols, dscale_acc, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _meta(D: int, device: torch.device) -> dict:
    """Launch meta-parameters: the whole row in one block (masked to D), so each row is read once and
    its statistics stay in registers; warps grow with the row so each thread keeps <= 16 values."""
    block = triton.next_power_of_2(D)
    warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return dict(BLOCK=block, num_warps=warps, EMULATE_RNE=device.type != "cuda")


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs share a row reduction: enough to fill the GPU once, few partials to sum.

    On CPU (Triton's interpreter) a small number keeps the two-stage reduction exercised.
    """
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [M, D] with unit stride on D (a view when possible, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """Keep any outer strides (views from chunk/unsqueeze stay copy-free) but need unit stride on D."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _l_stride(t: torch.Tensor) -> int:
    # A broadcast dim of size 1 is read with stride 0 whatever stride it was created with.
    return 0 if t.shape[1] == 1 else t.stride(1)


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = _rows(x)  # (M, D)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _rms_norm_fwd_kernel[(M,)](
        x2, weight.contiguous(), y, rstd, x2.stride(0), D, D, eps, **_meta(D, x.device)
    )
    return y, rstd


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)  # (M, D)
    M = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = max(1, min(M, _target_programs(x.device)))
    rows_per_prog = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_prog)
    dw_part = torch.empty((programs, D), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, dx, dw_part,
        dy2.stride(0), x2.stride(0), D, M, D, rows_per_prog,
        **_meta(D, x.device),
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype)


def _rms_norm_modulate_fwd(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, D = x.shape
    x, shift, scale = _unit_last(x), _unit_last(shift), _unit_last(scale)
    y = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    rstd = torch.empty((B, L), dtype=torch.float32, device=x.device)
    _rms_norm_modulate_fwd_kernel[(B * L,)](
        x, weight.contiguous(), shift, scale, y, rstd,
        x.stride(0), x.stride(1), shift.stride(0), _l_stride(shift), scale.stride(0), _l_stride(scale),
        L, D, eps, **_meta(D, x.device),
    )  # fmt: skip
    return y, rstd


def _rms_norm_modulate_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor
) -> list[torch.Tensor]:
    """-> [dx, dweight, dscale] plus dshift for per-sample shift/scale (per token, dshift is dy itself)."""
    B, L, D = x.shape
    per_sample = scale.shape[1] == 1
    dy, x, scale = _unit_last(dy), _unit_last(x), _unit_last(scale)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    chunks = max(1, min(L, triton.cdiv(_target_programs(x.device), B)))
    rows_per_prog = triton.cdiv(L, chunks)
    chunks = triton.cdiv(L, rows_per_prog)
    f32 = dict(dtype=torch.float32, device=x.device)
    dw_part = torch.empty((B * chunks, D), **f32)
    if per_sample:
        dshift_part, dscale_part = torch.empty((B, chunks, D), **f32), torch.empty((B, chunks, D), **f32)
        dscale = dscale_part  # unused by the kernel in this layout; any valid pointer will do
    else:
        dscale = torch.empty((B, L, D), dtype=scale.dtype, device=x.device)
        dshift_part = dscale_part = dw_part  # unused by the kernel in this layout
    _rms_norm_modulate_bwd_kernel[(B, chunks)](
        dy, x, weight.contiguous(), scale, rstd, dx, dw_part, dscale, dshift_part, dscale_part,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), scale.stride(0), _l_stride(scale),
        L, D, rows_per_prog, PER_SAMPLE=per_sample, **_meta(D, x.device),
    )  # fmt: skip
    dweight = dw_part.sum(0).to(weight.dtype)
    if per_sample:
        return [
            dx,
            dweight,
            dscale_part.sum(1, keepdim=True).to(scale.dtype),
            dshift_part.sum(1, keepdim=True),
        ]
    return [dx, dweight, dscale]


# ----------------------------------------------------------------------------- torch.library ops
# custom_op (not triton_op): its body runs the launcher as an opaque call, which works eagerly and
# under torch.compile(fullgraph=True) both on GPUs and with Triton's CPU interpreter.


@torch.library.custom_op("rectok::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_fwd(x, weight, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[:-1], dtype=torch.float32
    )


@torch.library.custom_op("rectok::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_bwd(dy, x, weight, rstd)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_bwd_op(dy, x, weight, rstd)
    return dx, dweight, None


_rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


@torch.library.custom_op("rectok::rms_norm_modulate_fwd", mutates_args=())
def _rms_norm_modulate_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_modulate_fwd(x, weight, shift, scale, eps)


@_rms_norm_modulate_fwd_op.register_fake
def _(x, weight, shift, scale, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[:2], dtype=torch.float32
    )


@torch.library.custom_op("rectok::rms_norm_modulate_bwd", mutates_args=())
def _rms_norm_modulate_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rstd: torch.Tensor
) -> list[torch.Tensor]:
    return _rms_norm_modulate_bwd(dy, x, weight, scale, rstd)


@_rms_norm_modulate_bwd_op.register_fake
def _(dy, x, weight, scale, rstd):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dscale = torch.empty(scale.shape, dtype=scale.dtype, device=scale.device)
    if scale.shape[1] == 1:
        return [
            dx,
            torch.empty_like(weight),
            dscale,
            torch.empty(scale.shape, dtype=torch.float32, device=x.device),
        ]
    return [dx, torch.empty_like(weight), dscale]


def _rms_norm_modulate_setup(ctx, inputs, output):
    x, weight, shift, scale, _ = inputs
    ctx.shift_dtype = shift.dtype
    ctx.save_for_backward(x, weight, scale, output[1])


def _rms_norm_modulate_backward(ctx, dy, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    grads = _rms_norm_modulate_bwd_op(dy, x, weight, scale, rstd)
    # Per-token shift: d(out)/d(shift) is the identity, so its gradient is dy (no copy, no kernel write).
    dshift = grads[3] if len(grads) == 4 else dy
    return grads[0], grads[1], dshift.to(ctx.shift_dtype), grads[2], None


_rms_norm_modulate_fwd_op.register_autograd(
    _rms_norm_modulate_backward, setup_context=_rms_norm_modulate_setup
)


# ----------------------------------------------------------------------------- functional API


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Same as F.rms_norm(x, (D,), weight, eps) for x [..., D], statistics in float32."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match width {x.shape[-1]}")
    if use_triton(x, weight, op="rms_norm"):
        return _rms_norm_fwd_op(x, weight, float(eps))[0]
    if x.dtype == weight.dtype == torch.float32:
        # torch's own op: with autograd on it runs the reference's formula (bit-identical, same
        # backward); without (inference, sampling) its fused kernel, as nn.RMSNorm in the release.
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """rms_norm(x, weight) * (1 + scale) + shift for x [B, L, D], shift/scale [B, 1, D] or [B, L, D]."""
    B, L, D = x.shape
    if shift.shape != scale.shape or shift.shape not in ((B, 1, D), (B, L, D)):
        raise ValueError(
            f"rms_norm_modulate: shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must both be "
            f"[B, 1, D] or [B, L, D] for x {tuple(x.shape)}"
        )
    if weight.shape != (D,):
        raise ValueError(f"rms_norm_modulate: weight {tuple(weight.shape)} does not match width {D}")
    if use_triton(x, weight, shift, scale, op="rms_norm_modulate"):
        return _rms_norm_modulate_fwd_op(x, weight, shift, scale, float(eps))[0]
    return rms_norm_modulate_reference(x, weight, shift, scale, eps)
