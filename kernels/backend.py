"""Which implementation of a fused op runs: the Triton kernel or the PyTorch reference.

The choice comes from, in order: the innermost `use_backend(...)` context, the
environment variable RECTOK_KERNELS, and the default "auto".

- "auto":   Triton for CUDA tensors, the PyTorch reference otherwise; under torch.compile, per op
            what kernels/compiled_choice.py says was measured faster there (else the reference,
            which Inductor fuses with its neighbours).
- "triton": always Triton. CPU tensors need Triton's numpy interpreter, which is only
            active when TRITON_INTERPRET=1 was set before triton was imported.
- "torch":  always the PyTorch reference (what `torch.compile` fuses best by itself).

Under `torch.compile` the choice is made while tracing, so a compiled function keeps
the backend that was active when it was compiled.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from .compiled_choice import compiled_choice

BACKENDS = ("auto", "triton", "torch")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("rectok_kernels_backend", default=None)


class TritonInterpreterRequired(RuntimeError):
    """The Triton backend was asked to run on CPU tensors without Triton's interpreter."""


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The backend in force: context manager first, then RECTOK_KERNELS, then "auto"."""
    name = _override.get()
    if name is None:
        name = os.environ.get("RECTOK_KERNELS", "auto").strip().lower() or "auto"
    return _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with the given kernel backend ("auto", "triton" or "torch")."""
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


# Checked once at import: a plain bool is free to read while torch.compile traces (a cached
# function call there would make Dynamo warn on every compile).
_TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def interpreter_active() -> bool:
    """True when Triton runs kernels with its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor, op: str | None = None) -> bool:
    """Decide whether op `op` on these tensors runs the Triton kernel.

    Raises a clear error when "triton" is forced but cannot run here.
    """
    name = current_backend()
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        if not (on_cuda and triton_available()):
            return False
        if op is not None and torch.compiler.is_compiling():
            return compiled_choice(op) == "triton"
        return True
    if not triton_available():
        raise RuntimeError(
            "kernel backend 'triton' was requested but triton is not installed (pip install triton)"
        )
    if not on_cuda and not interpreter_active():
        raise TritonInterpreterRequired(
            "kernel backend 'triton' was requested for CPU tensors, which needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 in the environment before Python starts, or use the 'torch' backend"
        )
    return True
