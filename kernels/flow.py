"""Forward-flow interpolation x_t = (1 - tau) x0 + tau noise and the velocity MSE loss.

Two ops on the rectified-flow path (SPEC sections 2 and 6):

- `flow_interpolate`: elementwise, one read of x0/noise, one write of x_t. Inductor fuses
  the reference equally well; the kernel keeps eager and compiled paths identical and
  gives the backward (d x0, d noise and, when asked, d tau) in one pass.
- `velocity_mse`: mean((pred - (data - noise))^2) and its gradient in one pass. The target
  data - noise is never materialised and the gradient 2 r / N is written during the
  forward, so the backward only scales it by grad_output (no second read of the inputs).

Layers: Triton kernels -> host launchers (flatten, pick BLOCK / warps) -> `torch.library`
custom ops with fake and autograd registrations (they stay whole under
`torch.compile(fullgraph=True)`) -> the functional API, which picks Triton or the
reference through `backend.use_triton`.
"""

from __future__ import annotations

import torch

from .backend import interpreter_active, use_triton
from .triton_utils import jit, store_cast, tl, triton

# ----------------------------------------------------------------------------- reference


def _per_sample(tau: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """tau [B] -> [B, 1, ..., 1] in float32, broadcastable against `like`."""
    return tau.float().reshape(-1, *([1] * (like.ndim - 1)))


def flow_interpolate_reference(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    t = _per_sample(tau, x0)
    return ((1.0 - t) * x0.float() + t * noise.float()).to(x0.dtype)


def velocity_mse_reference(pred: torch.Tensor, data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (pred.float() - (data.float() - noise.float())).square().mean()


# ----------------------------------------------------------------------------- kernels


@jit
def _flow_interpolate_fwd_kernel(
    x0_ptr, noise_ptr, tau_ptr, out_ptr, M, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    # grid = (cdiv(M, BLOCK), B): axis 1 is the sample (CUDA allows 65535 there), so tau is
    # one scalar load per program.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = b * M
    t = tl.load(tau_ptr + b).to(tl.float32)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    out = (1.0 - t) * x0 + t * noise
    # store_cast: round to nearest even under the interpreter too (it truncates fp32 -> bf16).
    store_cast(out_ptr + base + offs, out, mask, INTERPRET)


@jit
def _flow_interpolate_bwd_kernel(
    grad_ptr,
    x0_ptr,
    noise_ptr,
    tau_ptr,
    grad_x0_ptr,
    grad_noise_ptr,
    tau_partial_ptr,
    M,
    BLOCK: tl.constexpr,
    TAU_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # d x0 = (1 - tau) g, d noise = tau g; d tau[b] = sum_row g (noise - x0), reduced in two
    # stages: one fp32 partial per (sample, block) here, summed over blocks on the host.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = b * M
    t = tl.load(tau_ptr + b).to(tl.float32)
    g = tl.load(grad_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    store_cast(grad_x0_ptr + base + offs, (1.0 - t) * g, mask, INTERPRET)
    store_cast(grad_noise_ptr + base + offs, t * g, mask, INTERPRET)
    if TAU_GRAD:
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        noise = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(tau_partial_ptr + b * tl.num_programs(0) + pid_m, tl.sum(g * (noise - x0), axis=0))


@jit
def _velocity_mse_kernel(
    pred_ptr,
    data_ptr,
    noise_ptr,
    partial_ptr,
    grad_ptr,
    N,
    grad_scale,
    BLOCK: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # r = pred - (data - noise); loss partial = sum r^2 per program (fp32, no atomics);
    # grad = (2 / N) r, the derivative of the mean w.r.t. pred (data: -grad, noise: +grad).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    pred = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    data = tl.load(data_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = pred - (data - noise)
    tl.store(partial_ptr + pid, tl.sum(r * r, axis=0))
    if NEED_GRAD:
        # Float arguments can arrive as fp64 (Inductor-launched kernels) or as Python floats
        # (the interpreter, where `.to` fails); tl.cast keeps the arithmetic in fp32 for both.
        g = r * tl.cast(grad_scale, tl.float32)
        store_cast(grad_ptr + offs, g, mask, INTERPRET)


# ----------------------------------------------------------------------------- launchers


def _elementwise_block(width: int) -> tuple[int, int]:
    """BLOCK and num_warps for a memory-bound elementwise pass over rows of `width` elements."""
    block = min(4096, max(128, triton.next_power_of_2(width)))
    return block, 4 if block <= 1024 else 8


def _flow_interpolate_fwd(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    b = x0.shape[0]
    m = x0.numel() // b if b else 0
    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    if out.numel() == 0:
        return out
    block, warps = _elementwise_block(m)
    grid = (triton.cdiv(m, block), b)
    _flow_interpolate_fwd_kernel[grid](
        x0.contiguous(),
        noise.contiguous(),
        tau.contiguous(),
        out,
        m,
        BLOCK=block,
        INTERPRET=interpreter_active(),
        num_warps=warps,
    )
    return out


def _flow_interpolate_bwd(
    grad: torch.Tensor,
    x0: torch.Tensor | None,
    noise: torch.Tensor | None,
    tau: torch.Tensor,
    x0_dtype: torch.dtype,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x_t w.r.t. x0, noise and tau; d tau only when x0 and noise are given."""
    tau_grad = x0 is not None and noise is not None
    b = grad.shape[0]
    m = grad.numel() // b if b else 0
    grad = grad.contiguous()
    grad_x0 = torch.empty(grad.shape, dtype=x0_dtype, device=grad.device)
    grad_noise = torch.empty(grad.shape, dtype=noise_dtype, device=grad.device)
    grad_tau = torch.zeros_like(tau)
    if grad.numel() == 0:
        return grad_x0, grad_noise, grad_tau
    block, warps = _elementwise_block(m)
    grid = (triton.cdiv(m, block), b)
    partial = torch.empty((b, grid[0]) if tau_grad else (1,), dtype=torch.float32, device=grad.device)
    _flow_interpolate_bwd_kernel[grid](
        grad,
        x0.contiguous() if tau_grad else grad,  # not read when TAU_GRAD is off
        noise.contiguous() if tau_grad else grad,
        tau.contiguous(),
        grad_x0,
        grad_noise,
        partial,
        m,
        BLOCK=block,
        TAU_GRAD=tau_grad,
        INTERPRET=interpreter_active(),
        num_warps=warps,
    )
    if tau_grad:
        grad_tau = partial.sum(dim=1).to(tau.dtype)
    return grad_x0, grad_noise, grad_tau


def _velocity_mse_fwd(
    pred: torch.Tensor, data: torch.Tensor, noise: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n = pred.numel()
    grad = torch.empty(
        pred.shape if need_grad else (0,), dtype=_grad_dtype(pred, data, noise), device=pred.device
    )
    if n == 0:  # mean of nothing, like the reference
        return torch.full((), float("nan"), dtype=torch.float32, device=pred.device), grad
    block, warps = _elementwise_block(n)
    grid = (triton.cdiv(n, block),)
    partial = torch.empty(grid, dtype=torch.float32, device=pred.device)
    _velocity_mse_kernel[grid](
        pred.contiguous(),
        data.contiguous(),
        noise.contiguous(),
        partial,
        grad,
        n,
        2.0 / n,
        BLOCK=block,
        NEED_GRAD=need_grad,
        INTERPRET=interpreter_active(),
        num_warps=warps,
    )
    return partial.sum() / n, grad


def _grad_dtype(pred: torch.Tensor, data: torch.Tensor, noise: torch.Tensor) -> torch.dtype:
    """Dtype of the stored gradient: exact for every input (bf16 when all are bf16, fp32 if mixed)."""
    return torch.promote_types(torch.promote_types(pred.dtype, data.dtype), noise.dtype)


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("rectok::flow_interpolate", mutates_args=())
def _flow_interpolate_op(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return _flow_interpolate_fwd(x0, noise, tau)


@_flow_interpolate_op.register_fake
def _(x0, noise, tau):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("rectok::flow_interpolate_backward", mutates_args=())
def _flow_interpolate_backward_op(
    grad: torch.Tensor,
    x0: torch.Tensor | None,
    noise: torch.Tensor | None,
    tau: torch.Tensor,
    x0_dtype: torch.dtype,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flow_interpolate_bwd(grad, x0, noise, tau, x0_dtype, noise_dtype)


@_flow_interpolate_backward_op.register_fake
def _(grad, x0, noise, tau, x0_dtype, noise_dtype):
    return (
        grad.new_empty(grad.shape, dtype=x0_dtype),
        grad.new_empty(grad.shape, dtype=noise_dtype),
        tau.new_empty(tau.shape),
    )


def _flow_interpolate_setup(ctx, inputs, output):
    x0, noise, tau = inputs
    ctx.dtypes = (x0.dtype, noise.dtype)
    # x0 and noise are needed only for d tau; without it, keep nothing of them alive.
    if tau.requires_grad:
        ctx.save_for_backward(x0, noise, tau)
    else:
        ctx.save_for_backward(None, None, tau)


def _flow_interpolate_backward(ctx, grad):
    x0, noise, tau = ctx.saved_tensors
    grad_x0, grad_noise, grad_tau = _flow_interpolate_backward_op(grad, x0, noise, tau, *ctx.dtypes)
    return grad_x0, grad_noise, grad_tau if x0 is not None else None


_flow_interpolate_op.register_autograd(_flow_interpolate_backward, setup_context=_flow_interpolate_setup)


@torch.library.custom_op("rectok::velocity_mse", mutates_args=())
def _velocity_mse_op(
    pred: torch.Tensor, data: torch.Tensor, noise: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _velocity_mse_fwd(pred, data, noise, need_grad)


@_velocity_mse_op.register_fake
def _(pred, data, noise, need_grad):
    grad = pred.new_empty(pred.shape if need_grad else (0,), dtype=_grad_dtype(pred, data, noise))
    return pred.new_empty((), dtype=torch.float32), grad


def _velocity_mse_setup(ctx, inputs, output):
    pred, data, noise, _ = inputs
    ctx.dtypes = (pred.dtype, data.dtype, noise.dtype)
    ctx.save_for_backward(output[1])


def _velocity_mse_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    # d/d pred = +G, d/d data = -G, d/d noise = +G, each times grad_loss. Every input gets its
    # own fresh tensor: gradients that share storage can be corrupted by in-place accumulation.
    return (
        *(
            (grad * (grad_loss * sign)).to(dtype) if need else None
            for sign, dtype, need in zip((1.0, -1.0, 1.0), ctx.dtypes, ctx.needs_input_grad[:3])
        ),
        None,
    )


_velocity_mse_op.register_autograd(_velocity_mse_backward, setup_context=_velocity_mse_setup)


# ----------------------------------------------------------------------------- functional API


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(1 - tau) * x0 + tau * noise; tau [B] broadcasts over the other dims of x0 [B, ...]."""
    if x0.shape != noise.shape or tau.shape != (x0.shape[0],):
        raise ValueError(
            f"flow_interpolate: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}, tau {tuple(tau.shape)}"
        )
    if use_triton(x0, noise, tau, op="flow_interpolate"):
        return _flow_interpolate_op(x0, noise, tau)
    return flow_interpolate_reference(x0, noise, tau)


def velocity_mse(pred: torch.Tensor, data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """mean((pred - (data - noise))^2) as a float32 scalar, without materialising the target."""
    if not (pred.shape == data.shape == noise.shape):
        raise ValueError(
            f"velocity_mse: shapes differ {tuple(pred.shape)}, {tuple(data.shape)}, {tuple(noise.shape)}"
        )
    if use_triton(pred, data, noise, op="velocity_mse"):
        need_grad = torch.is_grad_enabled() and (
            pred.requires_grad or data.requires_grad or noise.requires_grad
        )
        loss, _ = _velocity_mse_op(pred, data, noise, need_grad)
        return loss
    return velocity_mse_reference(pred, data, noise)
