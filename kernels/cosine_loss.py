"""Cosine semantic distillation loss: mean over rows of 1 - cos(pred_row, target_row).

SPEC section 4: the semantic decoder's features are pulled towards the frozen teacher's
with this loss, so `target` is a constant. One Triton pass reads pred and target once,
writes one fp32 partial loss per program (summed on the host: a two-stage reduction, no
atomics) and, when pred needs a gradient, writes d loss / d pred as well; the backward
only scales that by grad_output.

eps follows `F.cosine_similarity` exactly (ATen's Distance.cpp): each norm is clamped on
its own, cos = <p / max(|p|, eps), t / max(|t|, eps)>, and the clamp is applied without
autograd, so the gradient still flows through the unclamped |p|:

    d cos / d p = t / (n_p n_t) - cos p / (n_p |p|),  n_p = max(|p|, eps), n_t = max(|t|, eps)

with the second term 0 when |p| = 0 (the norm's gradient at zero is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import interpreter_active, use_triton
from .triton_utils import jit, store_cast, tl, triton

# Widest row chunk held in registers. Wider rows are processed in chunks, in two sweeps
# (statistics, then gradient), which re-reads each row once.
_MAX_BLOCK_D = 8192


def cosine_distill_loss_reference(
    pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    cos = F.cosine_similarity(pred.float(), target.detach().float(), dim=-1, eps=eps)
    return (1.0 - cos).mean()


# ----------------------------------------------------------------------------- kernel


@jit
def _cosine_loss_kernel(
    pred_ptr,
    target_ptr,
    grad_ptr,
    partial_ptr,
    R,
    D,
    eps,
    grad_scale,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program owns BLOCK_R whole rows of the contiguous [R, D] inputs.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    row_start = rows.to(tl.int64)[:, None] * D  # (BLOCK_R, 1)
    cols = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    # Float arguments can arrive as fp64 (Inductor-launched kernels) or as Python floats (the
    # interpreter, where `.to` fails); tl.cast keeps the arithmetic in fp32 for both.
    eps = tl.cast(eps, tl.float32)

    # Row statistics in fp32: <p, t>, |p|^2, |t|^2.
    if NUM_CHUNKS == 1:
        mask = row_mask[:, None] & (cols < D)
        p = tl.load(pred_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(p * t, axis=1)
        pp = tl.sum(p * p, axis=1)
        tt = tl.sum(t * t, axis=1)
    else:
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        pp = tl.zeros([BLOCK_R], dtype=tl.float32)
        tt = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            ccols = c * BLOCK_D + cols
            mask = row_mask[:, None] & (ccols < D)
            p = tl.load(pred_ptr + row_start + ccols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(target_ptr + row_start + ccols, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(p * t, axis=1)
            pp += tl.sum(p * p, axis=1)
            tt += tl.sum(t * t, axis=1)

    norm_p = tl.sqrt_rn(pp)
    n_p = tl.maximum(norm_p, eps)
    n_t = tl.maximum(tl.sqrt_rn(tt), eps)
    # Divide one norm at a time: n_p * n_t could overflow or underflow where each alone does not.
    cos = dot / n_p / n_t
    tl.store(partial_ptr + pid, tl.sum(tl.where(row_mask, 1.0 - cos, 0.0), axis=0))

    if NEED_GRAD:
        # d loss / d p = scale * (cos p / (n_p |p|) - t / (n_p n_t)), scale = 1 / R.
        scale = tl.cast(grad_scale, tl.float32)
        nonzero = norm_p > 0.0
        inv_norm_p = tl.where(nonzero, 1.0 / tl.where(nonzero, norm_p, 1.0), 0.0)
        coef_p = (scale * cos / n_p * inv_norm_p)[:, None]
        coef_t = (scale / n_p / n_t)[:, None]
        # store_cast rounds to nearest even under the interpreter too (it truncates fp32 -> bf16).
        if NUM_CHUNKS == 1:
            g = coef_p * p - coef_t * t
            store_cast(grad_ptr + row_start + cols, g, mask, INTERPRET)
        else:
            for c in range(NUM_CHUNKS):
                ccols = c * BLOCK_D + cols
                mask = row_mask[:, None] & (ccols < D)
                p = tl.load(pred_ptr + row_start + ccols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(target_ptr + row_start + ccols, mask=mask, other=0.0).to(tl.float32)
                g = coef_p * p - coef_t * t
                store_cast(grad_ptr + row_start + ccols, g, mask, INTERPRET)


# ----------------------------------------------------------------------------- launcher


def _blocks(rows: int, width: int, max_block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_D, NUM_CHUNKS, num_warps): tiles of ~2K elements, whole rows when they fit."""
    block_d = min(max(16, triton.next_power_of_2(width)), max_block_d)
    num_chunks = triton.cdiv(width, block_d)
    block_r = max(1, min(triton.next_power_of_2(rows), 2048 // block_d))
    tile = block_r * block_d
    warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return block_r, block_d, num_chunks, warps


def _cosine_loss_fwd(
    pred: torch.Tensor, target: torch.Tensor, eps: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss fp32 scalar, d loss / d pred in pred's dtype, or an empty tensor if not needed)."""
    width = pred.shape[-1]
    p2 = pred.reshape(-1, width).contiguous()  # (R, D)
    t2 = target.reshape(-1, width).contiguous()  # (R, D)
    rows = p2.shape[0]
    grad = torch.empty(pred.shape if need_grad else (0,), dtype=pred.dtype, device=pred.device)
    if p2.numel() == 0:  # mean of nothing, like the reference
        return torch.full((), float("nan"), dtype=torch.float32, device=pred.device), grad
    block_r, block_d, num_chunks, warps = _blocks(rows, width, _MAX_BLOCK_D)
    grid = (triton.cdiv(rows, block_r),)
    partial = torch.empty(grid, dtype=torch.float32, device=pred.device)
    _cosine_loss_kernel[grid](
        p2,
        t2,
        grad,
        partial,
        rows,
        width,
        eps,
        1.0 / rows,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        NUM_CHUNKS=num_chunks,
        NEED_GRAD=need_grad,
        INTERPRET=interpreter_active(),
        num_warps=warps,
    )
    return partial.sum() / rows, grad


# ----------------------------------------------------------------------------- torch.library op


@torch.library.custom_op("rectok::cosine_distill_loss", mutates_args=())
def _cosine_loss_op(
    pred: torch.Tensor, target: torch.Tensor, eps: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cosine_loss_fwd(pred, target, eps, need_grad)


@_cosine_loss_op.register_fake
def _(pred, target, eps, need_grad):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty(pred.shape if need_grad else (0,))


def _cosine_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _cosine_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None  # target is a constant: no gradient


_cosine_loss_op.register_autograd(_cosine_loss_backward, setup_context=_cosine_loss_setup)


# ----------------------------------------------------------------------------- functional API


def cosine_distill_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Float32 scalar; rows are all leading dims of pred/target [..., D]; target gets no gradient."""
    if pred.shape != target.shape or pred.ndim == 0:
        raise ValueError(
            f"cosine_distill_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
            "must have the same shape [..., D]"
        )
    if use_triton(pred, target, op="cosine_distill_loss"):
        need_grad = torch.is_grad_enabled() and pred.requires_grad
        loss, _ = _cosine_loss_op(pred, target.detach(), float(eps), need_grad)
        return loss
    return cosine_distill_loss_reference(pred, target, eps)
