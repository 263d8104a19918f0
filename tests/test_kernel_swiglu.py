"""The Triton swiglu kernel computes what swiglu_reference computes.

What this file proves (on CPU the kernel runs under Triton's interpreter):
- Forward silu(a) * b and the gradient dh = [da | db] agree with the reference: float32 to ~1e-5
  relative; bfloat16 / float16 within twice the error that PyTorch's own computation makes on the
  same low-precision inputs, both measured against a float32 reference, plus a tiny floor.
- Odd hidden widths (3, 48, 72, 1000, 1025 = one block + 1, 5461 as in DiT^DH), a single row, 3-D
  inputs, non-contiguous inputs and a broadcast (stride-0) upstream gradient.
- The op stays one graph under torch.compile(fullgraph=True) with the Triton backend (fullgraph
  raises on a graph break), appears in that graph, and gives the eager result.
- An odd last dimension raises ValueError.
- Marked cuda (skipped without a GPU): the same comparisons at the model's hidden widths.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import autograd_nodes
from rectok.kernels import swiglu, swiglu_reference, use_backend

NAMES = ["y", "dh"]


def _run(
    fn, h: torch.Tensor, dy: torch.Tensor | None, backend: str, compiled: bool = False
) -> list[torch.Tensor]:
    """[output, dh] for fn(h) with upstream gradient dy (None: out.sum())."""
    leaf = h.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = fn(leaf)
    if (
        backend == "triton" and not compiled
    ):  # the Triton op really ran, not a silent fallback to the reference
        assert any("rectok" in name for name in autograd_nodes(out)), autograd_nodes(out)
    if dy is None:
        out.sum().backward()  # upstream gradient is a stride-0 broadcast of ones
    else:
        out.backward(dy)
    return [out.detach(), leaf.grad]


def _assert_fp32_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w, name in zip(got, want, NAMES, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        atol = 1e-5 * w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _assert_low_precision_close(h: torch.Tensor, dy: torch.Tensor) -> None:
    """Our error and PyTorch's on the same low-precision inputs, both against a float32 truth."""
    truth = _run(swiglu_reference, h.float(), dy.float(), "torch")
    torch_lp = _run(swiglu_reference, h, dy, "torch")
    ours = _run(swiglu, h, dy, "triton")
    for o, p, t, name in zip(ours, torch_lp, truth, NAMES, strict=True):
        assert o.dtype == p.dtype and o.shape == p.shape, name
        err_ours = (o.float() - t).abs().max().item()
        err_torch = (p.float() - t).abs().max().item()
        floor = 1e-4 * t.abs().max().item()
        assert err_ours <= 2 * err_torch + floor, f"{name}: error {err_ours:.3g} vs PyTorch's {err_torch:.3g}"


def _inputs(
    lead: tuple[int, ...], H: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = 2.0 * torch.randn(*lead, 2 * H, generator=g)  # wide enough to reach silu's saturated tails
    dy = torch.randn(*lead, H, generator=g)
    return h.to(dtype), dy.to(dtype)


# (leading dims, H)
SHAPES = [((4,), 3), ((1,), 72), ((3, 5), 48), ((2, 3), 1000), ((3,), 1025), ((2,), 5461)]


@pytest.mark.parametrize("lead, H", SHAPES, ids=str)
def test_swiglu_fp32(lead, H):
    h, dy = _inputs(lead, H, torch.float32)
    _assert_fp32_close(_run(swiglu, h, dy, "triton"), _run(swiglu_reference, h, dy, "torch"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead, H", [((3, 5), 48), ((2, 3), 1000), ((2,), 5461)], ids=str)
def test_swiglu_low_precision(lead, H, dtype):
    _assert_low_precision_close(*_inputs(lead, H, dtype))


def test_non_contiguous_inputs_and_gradients():
    g = torch.Generator().manual_seed(1)
    H = 72
    padded = torch.randn(2, 5, 2 * H + 6, generator=g)[..., : 2 * H]  # padded row pitch
    transposed = torch.randn(2, 2 * H, 5, generator=g).transpose(1, 2)  # unit stride on rows: needs a copy
    every_other = torch.randn(2, 10, 2 * H, generator=g)[:, ::2]
    for h in (padded, transposed, every_other):
        _assert_fp32_close(_run(swiglu, h, None, "triton"), _run(swiglu_reference, h, None, "torch"))
    # dy as a transposed view too.
    dy = torch.randn(2, H, 5, generator=g).transpose(1, 2)
    _assert_fp32_close(_run(swiglu, padded, dy, "triton"), _run(swiglu_reference, padded, dy, "torch"))


def test_swiglu_compiles_fullgraph():
    from torch._inductor.compile_fx import compile_fx

    graphs: list = []

    def record_then_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    h, dy = _inputs((2, 5), 48, torch.float32, seed=2)
    compiled = torch.compile(swiglu, fullgraph=True, backend=record_then_inductor)
    with use_backend("triton"):
        got = _run(compiled, h, dy, "triton", compiled=True)
        eager = _run(swiglu, h, dy, "triton")
    assert any("rectok.swiglu_fwd" in gm.code for gm in graphs)
    _assert_fp32_close(got, eager)


def test_odd_width_raises():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(3, 7))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H", [2048, 3072, 5461])
def test_swiglu_cuda_real_shapes(H, dtype):
    h, dy = (t.cuda() for t in _inputs((8, 256), H, dtype))
    if dtype == torch.float32:
        _assert_fp32_close(_run(swiglu, h, dy, "triton"), _run(swiglu_reference, h, dy, "torch"))
    else:
        _assert_low_precision_close(h, dy)
