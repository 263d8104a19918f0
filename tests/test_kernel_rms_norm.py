"""The Triton rms_norm and rms_norm_modulate kernels compute what their PyTorch references compute.

What this file proves (on CPU the kernels run under Triton's interpreter):
- Forward and the gradient of every input (x, weight, and shift/scale for the modulated form)
  agree with the reference: float32 to ~1e-5 relative; bfloat16 / float16 within twice the error
  that PyTorch's own computation makes on the same low-precision inputs, both measured against a
  float32 reference, plus a tiny floor.
- Odd widths (48, 72, 1000), a single row, row counts not divisible by the rows one backward
  program reduces (so the two-stage dW / dshift / dscale sums see uneven partials), widths up to
  8192 (masked blocks), non-contiguous inputs and gradients, both shift/scale layouts (per sample
  [B, 1, D], per token [B, L, D]) and mixed dtypes (bf16 activations, fp32 parameters).
- Each op stays one graph under torch.compile(fullgraph=True) with the Triton backend (fullgraph
  raises on a graph break), appears in that graph, and gives the eager result.
- rms_norm_reference matches F.rms_norm in float32; bad shapes raise ValueError.
- Marked cuda (skipped without a GPU): the same comparisons at the model's real shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import autograd_nodes
from rectok.kernels import (
    rms_norm,
    rms_norm_modulate,
    rms_norm_modulate_reference,
    rms_norm_reference,
    use_backend,
)

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _run(
    fn, inputs: list[torch.Tensor], dy: torch.Tensor | None, backend: str, compiled: bool = False
) -> list[torch.Tensor]:
    """[output, grad of each input] for fn(*inputs) with upstream gradient dy (None: out.sum())."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with use_backend(backend):
        out = fn(*leaves)
    if (
        backend == "triton" and not compiled
    ):  # the Triton op really ran, not a silent fallback to the reference
        assert any("rectok" in name for name in autograd_nodes(out)), autograd_nodes(out)
    if dy is None:
        out.sum().backward()  # upstream gradient is a stride-0 broadcast of ones
    else:
        out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


def _assert_fp32_close(got: list[torch.Tensor], want: list[torch.Tensor], names: list[str]) -> None:
    for g, w, name in zip(got, want, names, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(
            g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}"
        )


def _assert_low_precision_close(fn, reference, inputs, dy, names) -> None:
    """Our error and PyTorch's on the same low-precision inputs, both against a float32 truth."""
    truth = _run(reference, [t.float() for t in inputs], dy.float(), "torch")
    torch_lp = _run(reference, inputs, dy, "torch")
    ours = _run(fn, inputs, dy, "triton")
    for o, p, t, name in zip(ours, torch_lp, truth, names, strict=True):
        assert o.dtype == p.dtype and o.shape == p.shape, name
        err_ours = (o.float() - t).abs().max().item()
        err_torch = (p.float() - t).abs().max().item()
        floor = 1e-4 * t.abs().max().item()
        assert err_ours <= 2 * err_torch + floor, f"{name}: error {err_ours:.3g} vs PyTorch's {err_torch:.3g}"


def _rms_inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    w = 1.0 + 0.1 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return [x.to(dtype), w.to(dtype), dy.to(dtype)]


def _modulate_inputs(
    B: int, L: int, D: int, per_sample: bool, dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    w = 1.0 + 0.1 * torch.randn(D, generator=g)
    Ls = 1 if per_sample else L
    shift, scale = 0.5 * torch.randn(B, Ls, D, generator=g), 0.5 * torch.randn(B, Ls, D, generator=g)
    dy = torch.randn(B, L, D, generator=g)
    return [t.to(dtype) for t in (x, w, shift, scale, dy)]


RMS_SHAPES = [(4, 48), (1, 72), (3, 7, 1000), (2, 5, 192), (9, 8192)]
# (B, L, D, per_sample): L not divisible by the rows one backward program takes, B = 1, a single row.
MODULATE_SHAPES = [
    (2, 5, 48, True),
    (2, 5, 48, False),
    (3, 7, 72, True),
    (1, 13, 72, False),
    (1, 1, 1000, True),
    (2, 9, 1000, False),
    (1, 3, 8192, True),
]
RMS_NAMES = ["y", "dx", "dweight"]
MODULATE_NAMES = ["y", "dx", "dweight", "dshift", "dscale"]


@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
def test_rms_norm_fp32(shape):
    x, w, dy = _rms_inputs(shape, torch.float32)
    _assert_fp32_close(
        _run(rms_norm, [x, w], dy, "triton"), _run(rms_norm_reference, [x, w], dy, "torch"), RMS_NAMES
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(4, 48), (3, 7, 1000), (9, 8192)], ids=str)
def test_rms_norm_low_precision(shape, dtype):
    x, w, dy = _rms_inputs(shape, dtype)
    _assert_low_precision_close(rms_norm, rms_norm_reference, [x, w], dy, RMS_NAMES)


@pytest.mark.parametrize("shape", MODULATE_SHAPES, ids=str)
def test_rms_norm_modulate_fp32(shape):
    x, w, shift, scale, dy = _modulate_inputs(*shape, torch.float32)
    inputs = [x, w, shift, scale]
    got = _run(rms_norm_modulate, inputs, dy, "triton")
    _assert_fp32_close(got, _run(rms_norm_modulate_reference, inputs, dy, "torch"), MODULATE_NAMES)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 48, True), (2, 9, 1000, False), (3, 7, 1000, True)], ids=str)
def test_rms_norm_modulate_low_precision(shape, dtype):
    x, w, shift, scale, dy = _modulate_inputs(*shape, dtype)
    _assert_low_precision_close(
        rms_norm_modulate, rms_norm_modulate_reference, [x, w, shift, scale], dy, MODULATE_NAMES
    )


def test_mixed_dtypes_keep_each_inputs_dtype():
    """bf16 activations, fp32 parameters (autocast style): output in x's dtype, each grad in its input's."""
    x, w, shift, scale, dy = _modulate_inputs(2, 5, 72, True, torch.float32)
    x, dy = x.bfloat16(), dy.bfloat16()
    _assert_low_precision_close(
        rms_norm_modulate, rms_norm_modulate_reference, [x, w, shift, scale], dy, MODULATE_NAMES
    )
    _assert_low_precision_close(rms_norm, rms_norm_reference, [x, w], dy, RMS_NAMES)


def test_non_contiguous_inputs_and_gradients():
    """Strided views in, broadcast (stride-0) upstream gradient: no layout assumption in the launchers."""
    g = torch.Generator().manual_seed(3)
    B, L, D = 2, 6, 72
    x = torch.randn(B, 2 * L, D + 8, generator=g)[:, ::2, :D]  # strided rows, padded row pitch
    xt = torch.randn(B, D, L, generator=g).transpose(1, 2)  # unit stride on L, not on D: needs a copy
    w = 1.0 + 0.1 * torch.randn(D, generator=g)
    ada = torch.randn(B, 2 * D, generator=g)  # DiT adaLN output, chunked into shift / scale views
    shift, scale = (t.unsqueeze(1) for t in ada.chunk(2, dim=-1))
    for xin in (x, xt):
        _assert_fp32_close(
            _run(rms_norm, [xin, w], None, "triton"),
            _run(rms_norm_reference, [xin, w], None, "torch"),
            RMS_NAMES,
        )
        inputs = [xin, w, shift, scale]
        want = _run(rms_norm_modulate_reference, inputs, None, "torch")
        _assert_fp32_close(_run(rms_norm_modulate, inputs, None, "triton"), want, MODULATE_NAMES)
    # The chunked views themselves (not clones) as leaves of the graph.
    ada_leaf = ada.clone().requires_grad_(True)
    with use_backend("triton"):
        shift_v, scale_v = (t.unsqueeze(1) for t in ada_leaf.chunk(2, dim=-1))
        rms_norm_modulate(x, w, shift_v, scale_v).sum().backward()
    ada_ref = ada.clone().requires_grad_(True)
    shift_r, scale_r = (t.unsqueeze(1) for t in ada_ref.chunk(2, dim=-1))
    rms_norm_modulate_reference(x, w, shift_r, scale_r).sum().backward()
    torch.testing.assert_close(
        ada_leaf.grad, ada_ref.grad, rtol=1e-5, atol=1e-5 * ada_ref.grad.abs().max().item()
    )


def _graph_recorder(graphs: list):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    return backend


def test_rms_norm_compiles_fullgraph():
    x, w, dy = _rms_inputs((3, 5, 48), torch.float32, seed=4)
    graphs: list = []
    compiled = torch.compile(rms_norm, fullgraph=True, backend=_graph_recorder(graphs))
    with use_backend("triton"):
        got = _run(compiled, [x, w], dy, "triton", compiled=True)
        eager = _run(rms_norm, [x, w], dy, "triton")
    assert any("rectok.rms_norm_fwd" in gm.code for gm in graphs)
    _assert_fp32_close(got, eager, RMS_NAMES)


def test_rms_norm_modulate_compiles_fullgraph():
    x, w, shift, scale, dy = _modulate_inputs(2, 5, 48, True, torch.float32, seed=5)
    graphs: list = []
    compiled = torch.compile(rms_norm_modulate, fullgraph=True, backend=_graph_recorder(graphs))
    inputs = [x, w, shift, scale]
    with use_backend("triton"):
        got = _run(compiled, inputs, dy, "triton", compiled=True)
        eager = _run(rms_norm_modulate, inputs, dy, "triton")
    assert any("rectok.rms_norm_modulate_fwd" in gm.code for gm in graphs)
    _assert_fp32_close(got, eager, MODULATE_NAMES)


def test_reference_matches_torch_rms_norm():
    x, w, dy = _rms_inputs((5, 7, 72), torch.float32, seed=6)
    want = _run(lambda x, w: F.rms_norm(x, (72,), w, 1e-6), [x, w], dy, "torch")
    _assert_fp32_close(_run(rms_norm_reference, [x, w], dy, "torch"), want, RMS_NAMES)


def test_torch_backend_is_the_reference_in_training_and_the_fused_op_in_inference():
    # With autograd on, the torch path is the reference's formula bit for bit (forward and both
    # gradients: training numerics are the reference's); without, torch's fused kernel, which is
    # what nn.RMSNorm (the release) runs, within rounding of the reference.
    x, w, dy = _rms_inputs((4, 9, 192), torch.float32, seed=7)
    with use_backend("torch"):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        ya, yb = rms_norm(xa, wa), rms_norm_reference(xb, wb)
        assert torch.equal(ya, yb)
        ga, gb = torch.autograd.grad(ya, (xa, wa), dy), torch.autograd.grad(yb, (xb, wb), dy)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
        with torch.no_grad():
            y = rms_norm(x, w)
        release_norm = torch.nn.RMSNorm(192, eps=1e-6)
        release_norm.weight.data.copy_(w)
        with torch.no_grad():
            assert torch.equal(y, release_norm(x))
        torch.testing.assert_close(y, rms_norm_reference(x, w), rtol=1e-6, atol=1e-6)


def test_bad_shapes_raise():
    x = torch.randn(2, 5, 48)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(47))
    with pytest.raises(ValueError, match="shift"):
        rms_norm_modulate(x, torch.ones(48), torch.zeros(2, 2, 48), torch.zeros(2, 2, 48))
    with pytest.raises(ValueError, match="weight"):
        rms_norm_modulate(x, torch.ones(47), torch.zeros(2, 1, 48), torch.zeros(2, 1, 48))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [192, 768, 1024, 1152, 2048, 8192])
def test_rms_norm_cuda_real_shapes(D, dtype):
    x, w, dy = (t.cuda() for t in _rms_inputs((8, 256, D), dtype))
    if dtype == torch.float32:
        _assert_fp32_close(
            _run(rms_norm, [x, w], dy, "triton"), _run(rms_norm_reference, [x, w], dy, "torch"), RMS_NAMES
        )
    else:
        _assert_low_precision_close(rms_norm, rms_norm_reference, [x, w], dy, RMS_NAMES)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D, per_sample", [(1152, True), (2048, False), (768, True), (1152, False)])
def test_rms_norm_modulate_cuda_real_shapes(D, per_sample, dtype):
    x, w, shift, scale, dy = (t.cuda() for t in _modulate_inputs(8, 256, D, per_sample, dtype))
    inputs = [x, w, shift, scale]
    if dtype == torch.float32:
        want = _run(rms_norm_modulate_reference, inputs, dy, "torch")
        _assert_fp32_close(_run(rms_norm_modulate, inputs, dy, "triton"), want, MODULATE_NAMES)
    else:
        _assert_low_precision_close(
            rms_norm_modulate, rms_norm_modulate_reference, inputs, dy, MODULATE_NAMES
        )
