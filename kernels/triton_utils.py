"""Triton import guard and small device functions shared by the kernel files.

Without a triton wheel (macOS, Windows) `triton` and `tl` are None and `jit` leaves the
function undecorated: the kernels are never launched there, the PyTorch references run.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


@jit
def cast_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 tile -> dtype, rounding to nearest even like the GPU does.

    Triton's CPU interpreter truncates fp32 -> bf16, which doubles the error the CPU tests
    see; under the interpreter (INTERPRET, a constexpr, so GPU code never has this branch)
    the fp32 bits are rounded by hand first.
    """
    if INTERPRET:
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@jit
def store_cast(ptr, y, mask, INTERPRET: tl.constexpr):
    """tl.store of an fp32 tile into ptr's dtype with the GPU's rounding (see cast_to)."""
    tl.store(ptr, cast_to(y, ptr.dtype.element_ty, INTERPRET), mask=mask)
