"""The Triton flow kernels compute what their PyTorch references compute.

Proves, for `flow_interpolate` and `velocity_mse` (kernels/flow.py):
- forward and every gradient (x0, noise, tau; pred, data, noise) of the Triton path match the
  reference: fp32 to ~1e-5 relative, fp16 to fp16 rounding, bf16 within 2x PyTorch's own
  bf16 error against an fp32 reference, over odd widths (48, 72, 1000), a single row, rows
  not divisible by the block, several blocks per sample, and non-contiguous inputs;
- the `torch.library` ops keep `torch.compile(fullgraph=True)` in one graph (Triton path and
  reference path) with the same values and gradients, and pass `torch.library.opcheck`;
- backend selection: "triton" on CPU without the interpreter fails with a clear RuntimeError,
  "torch" runs the reference, and mismatched shapes raise ValueError.

On CPU the kernels run under Triton's interpreter (tests/conftest.py), so shapes are small.
The interpreter truncates fp32 -> bf16; the kernels' stores round by hand there
(`store_cast`), so the bf16 bound is the same on CPU and GPU.
"""

from __future__ import annotations

import pytest
import rectok.kernels.backend as backend
import torch
from kernel_checks import check_bf16, check_fp32
from rectok.kernels import (
    flow_interpolate,
    flow_interpolate_reference,
    use_backend,
    velocity_mse,
    velocity_mse_reference,
)
from torch._dynamo.testing import CompileCounterWithBackend

# B x ...: one row; odd widths; per-sample widths above the 4096 block (two blocks, the last
# partial); velocity_mse over 2*7*1000 = 14000 elements spans 4 programs, the last partial.
SHAPES = [(1, 48), (3, 72), (2, 7, 1000), (2, 5100)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    tau = torch.rand(shape[0], generator=g).to(dtype)
    return x0, noise, tau


def _loss_inputs(shape, dtype, seed=0):
    """pred, data, noise for velocity_mse."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


def _forward_backward(fn, inputs, backend_name, seed=1):
    """Output and the gradient of every input for a fixed random grad_output."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with use_backend(backend_name):
        out = fn(*leaves)
    # bf16-representable, so that fp32 and bf16 runs see exactly the same grad_output.
    g = (
        torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        .bfloat16()
        .to(out.device, out.dtype)
    )
    out.backward(g)
    return out.detach(), [x.grad for x in leaves]


def _compare_fp32(fn, ref_fn, inputs):
    out, grads = _forward_backward(fn, inputs, "triton")
    ref, ref_grads = _forward_backward(ref_fn, inputs, "torch")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    for ours, expected in zip([out, *grads], [ref, *ref_grads]):
        check_fp32(ours, expected)


def _compare_bf16(fn, ref_fn, native_fn, inputs):
    """Triton on bf16 inputs vs the reference on the same values in fp32 and vs plain bf16 PyTorch."""
    out, grads = _forward_backward(fn, inputs, "triton")
    ref32, ref32_grads = _forward_backward(ref_fn, [x.float() for x in inputs], "torch")
    native, native_grads = _forward_backward(native_fn, inputs, "torch")
    same, same_grads = _forward_backward(ref_fn, inputs, "torch")
    assert out.dtype == same.dtype
    assert all(g.dtype == torch.bfloat16 for g in grads)
    check_bf16(out, ref32, native.to(out.dtype), same)
    for ours, *refs in zip(grads, ref32_grads, native_grads, same_grads):
        check_bf16(ours, *refs)


def _flow_bf16_native(x0, noise, tau):
    """What plain bf16 PyTorch computes: every op rounded to bf16."""
    t = tau.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def _velocity_bf16_native(pred, data, noise):
    return (pred - (data - noise)).square().mean()


# ----------------------------------------------------------------------------- flow_interpolate


@pytest.mark.parametrize("shape", SHAPES)
def test_flow_interpolate_fp32(shape):
    _compare_fp32(flow_interpolate, flow_interpolate_reference, _inputs(shape, torch.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_flow_interpolate_bf16(shape):
    _compare_bf16(
        flow_interpolate, flow_interpolate_reference, _flow_bf16_native, _inputs(shape, torch.bfloat16)
    )


def test_flow_interpolate_fp16_and_mixed_dtypes():
    x0, noise, tau = _inputs((3, 72), torch.float16)
    inputs = (x0, noise.float(), tau.float())  # noise fp32: its gradient stays fp32
    out, grads = _forward_backward(flow_interpolate, inputs, "triton")
    ref, ref_grads = _forward_backward(flow_interpolate_reference, inputs, "torch")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for ours, expected in zip(grads, ref_grads):
        assert ours.dtype == expected.dtype
        torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)


def test_flow_interpolate_non_contiguous_and_no_tau_grad():
    x0, noise, tau = _inputs((72, 3, 5), torch.float32)
    x0, noise, tau = x0.transpose(0, 2), noise.transpose(0, 2), tau[::15]  # (5, 3, 72), strided; tau (5,)
    x0 = x0.detach().requires_grad_(True)
    assert not x0.is_contiguous()
    with use_backend("triton"):
        out = flow_interpolate(x0, noise, tau)
    out.sum().backward()
    check_fp32(out.detach(), flow_interpolate_reference(x0.detach(), noise, tau))
    check_fp32(x0.grad, (1 - tau).reshape(-1, 1, 1).expand(5, 3, 72))
    assert tau.grad is None


# ----------------------------------------------------------------------------- velocity_mse


@pytest.mark.parametrize("shape", SHAPES)
def test_velocity_mse_fp32(shape):
    _compare_fp32(velocity_mse, velocity_mse_reference, _loss_inputs(shape, torch.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_velocity_mse_bf16(shape):
    # The loss stays fp32 whatever the inputs; the gradients are bf16.
    _compare_bf16(
        velocity_mse, velocity_mse_reference, _velocity_bf16_native, _loss_inputs(shape, torch.bfloat16)
    )


def test_velocity_mse_partial_grads_fp16_and_non_contiguous():
    pred, data, noise = _loss_inputs((72, 6), torch.float16)
    pred = pred.t().requires_grad_(True)  # (6, 72), strided
    data, noise = data.reshape(6, 72), noise.reshape(6, 72).requires_grad_(True)
    with use_backend("triton"):
        loss = velocity_mse(pred, data, noise)
    loss.backward()
    p, n = pred.detach().clone().requires_grad_(True), noise.detach().clone().requires_grad_(True)
    ref = velocity_mse_reference(p, data, n)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(pred.grad, p.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(noise.grad, n.grad, rtol=1e-3, atol=1e-6)
    assert pred.grad.dtype == torch.float16 and data.grad is None


def test_velocity_mse_no_grad_needed():
    pred, data, noise = _loss_inputs((3, 72), torch.float32)
    with use_backend("triton"), torch.no_grad():
        loss = velocity_mse(pred, data, noise)
    check_fp32(loss, velocity_mse_reference(pred, data, noise))
    assert not loss.requires_grad


# ----------------------------------------------------------------------------- compile, opcheck


def _compiled_matches_eager(fn, inputs, backend_name):
    """fullgraph compile (errors on any graph break) gives eager's values and gradients.

    The Triton path goes through Inductor, which must keep the custom op as an opaque call;
    the reference path only needs to trace, so the cheaper aot_eager keeps the test fast.
    """
    counter = CompileCounterWithBackend("inductor" if backend_name == "triton" else "aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    out, grads = _forward_backward(compiled, inputs, backend_name)
    eager, eager_grads = _forward_backward(fn, inputs, backend_name)
    assert counter.frame_count == 1
    uses_kernel = any("rectok" in str(node.target) for gm in counter.graphs for node in gm.graph.nodes)
    assert uses_kernel == (backend_name == "triton")
    for ours, expected in zip([out, *grads], [eager, *eager_grads]):
        check_fp32(ours, expected)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_flow_interpolate_compiles_in_one_graph(backend_name):
    _compiled_matches_eager(flow_interpolate, _inputs((2, 3, 48), torch.float32), backend_name)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_velocity_mse_compiles_in_one_graph(backend_name):
    _compiled_matches_eager(velocity_mse, _loss_inputs((2, 3, 48), torch.float32), backend_name)


def test_opcheck_flow_ops():
    x0, noise, tau = _inputs((2, 48), torch.float32)
    x0.requires_grad_(True)
    tau.requires_grad_(True)
    torch.library.opcheck(torch.ops.rectok.flow_interpolate.default, (x0, noise, tau))
    torch.library.opcheck(
        torch.ops.rectok.velocity_mse.default, (x0, noise, tau[:, None].expand(2, 48), True)
    )


# ----------------------------------------------------------------------------- backend selection, errors


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(backend, "interpreter_active", lambda: False)
    x0, noise, tau = _inputs((2, 48), torch.float32)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flow_interpolate(x0, noise, tau)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        velocity_mse(x0, noise, x0)


def test_torch_backend_runs_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton op ran under the 'torch' backend")

    monkeypatch.setattr("rectok.kernels.flow._flow_interpolate_op", fail)
    monkeypatch.setattr("rectok.kernels.flow._velocity_mse_op", fail)
    x0, noise, tau = _inputs((2, 48), torch.float32)
    with use_backend("torch"):
        torch.testing.assert_close(
            flow_interpolate(x0, noise, tau), flow_interpolate_reference(x0, noise, tau)
        )
        torch.testing.assert_close(velocity_mse(x0, noise, x0), velocity_mse_reference(x0, noise, x0))


def test_wrong_shapes_raise():
    x0, noise, tau = _inputs((2, 48), torch.float32)
    with pytest.raises(ValueError, match="flow_interpolate"):
        flow_interpolate(x0, noise[:, :40], tau)
    with pytest.raises(ValueError, match="flow_interpolate"):
        flow_interpolate(x0, noise, tau[:1])
    with pytest.raises(ValueError, match="velocity_mse"):
        velocity_mse(x0, noise, x0[:1])


# ----------------------------------------------------------------------------- CUDA, realistic shapes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_ops_cuda_realistic(dtype):
    # Tokenizer latents: 64 samples x 256 tokens x 128 channels.
    flow_inputs = [x.cuda() for x in _inputs((64, 256, 128), dtype)]
    loss_inputs = [x.cuda() for x in _loss_inputs((64, 256, 128), dtype)]
    if dtype == torch.float32:
        _compare_fp32(flow_interpolate, flow_interpolate_reference, flow_inputs)
        _compare_fp32(velocity_mse, velocity_mse_reference, loss_inputs)
    else:
        _compare_bf16(flow_interpolate, flow_interpolate_reference, _flow_bf16_native, flow_inputs)
        _compare_bf16(velocity_mse, velocity_mse_reference, _velocity_bf16_native, loss_inputs)
