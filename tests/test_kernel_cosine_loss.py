"""The Triton cosine distillation loss computes what its PyTorch reference computes.

Proves, for `cosine_distill_loss` (kernels/cosine_loss.py):
- the loss and d loss / d pred of the Triton path match the reference: fp32 to ~1e-5
  relative, fp16 to fp16 rounding, bf16 within 2x PyTorch's own bf16 error against an fp32
  reference, over odd widths (48, 72, 1000), a single row, row counts not divisible by the
  rows-per-program block, rows wider than one register tile (the chunked path), leading dims
  flattened, and non-contiguous inputs;
- eps enters exactly as in `F.cosine_similarity` (each norm clamped on its own, gradient
  through the unclamped norm), checked at norms below eps and at zero;
- the target never receives a gradient, and grad_output scales the stored gradient;
- the `torch.library` op keeps `torch.compile(fullgraph=True)` in one graph (Triton path and
  reference path) with the same values and gradient, and passes `torch.library.opcheck`;
- backend selection: "triton" on CPU without the interpreter fails with a clear RuntimeError,
  "torch" runs the reference, and mismatched shapes raise ValueError.

On CPU the kernel runs under Triton's interpreter (tests/conftest.py), so shapes are small.
The interpreter truncates fp32 -> bf16; the kernel's stores round by hand there
(`store_cast`), so the bf16 bound is the same on CPU and GPU.
"""

from __future__ import annotations

import pytest
import rectok.kernels.backend as backend
import rectok.kernels.cosine_loss as cosine_loss
import torch
import torch.nn.functional as F
from kernel_checks import check_bf16, check_fp32
from rectok.kernels import cosine_distill_loss, cosine_distill_loss_reference, use_backend
from torch._dynamo.testing import CompileCounterWithBackend

# [..., D]: one row; odd widths; 37 rows of 72 = 3 programs of 16 rows, the last partial;
# 2 x 7 rows of 1000 = 7 programs of 2 rows (leading dims flattened).
SHAPES = [(1, 48), (5, 72), (37, 72), (2, 7, 1000)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g)
    # Correlated with pred so cos spans a useful range rather than sitting near 0.
    target = 0.6 * pred + torch.randn(shape, generator=g)
    return pred.to(dtype), target.to(dtype)


def _forward_backward(fn, pred, target, backend_name, seed=1, **kwargs):
    """Loss and d loss / d pred for a fixed random grad_output (bf16-representable, so that
    fp32 and bf16 runs see exactly the same one)."""
    leaf = pred.detach().clone().requires_grad_(True)
    with use_backend(backend_name):
        loss = fn(leaf, target, **kwargs)
    g = torch.randn((), generator=torch.Generator().manual_seed(seed)).bfloat16().to(loss.device, loss.dtype)
    loss.backward(g)
    return loss.detach(), leaf.grad


def _cosine_bf16_native(pred, target, eps=1e-8):
    """What plain bf16 PyTorch computes: norms, products and the mean in bf16."""
    return (1.0 - F.cosine_similarity(pred, target.detach(), dim=-1, eps=eps)).mean()


def _compare_fp32(pred, target, **kwargs):
    loss, grad = _forward_backward(cosine_distill_loss, pred, target, "triton", **kwargs)
    ref, ref_grad = _forward_backward(cosine_distill_loss_reference, pred, target, "torch", **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    check_fp32(loss, ref)
    check_fp32(grad, ref_grad)


def _compare_bf16(pred, target):
    loss, grad = _forward_backward(cosine_distill_loss, pred, target, "triton")
    ref32, ref32_grad = _forward_backward(
        cosine_distill_loss_reference, pred.float(), target.float(), "torch"
    )
    native, native_grad = _forward_backward(_cosine_bf16_native, pred, target, "torch")
    same, same_grad = _forward_backward(cosine_distill_loss_reference, pred, target, "torch")
    assert loss.dtype == torch.float32  # the loss is fp32 whatever the inputs
    assert grad.dtype == torch.bfloat16
    check_bf16(loss, ref32, native.float(), same)
    check_bf16(grad, ref32_grad, native_grad, same_grad)


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("shape", SHAPES)
def test_cosine_loss_fp32(shape):
    _compare_fp32(*_inputs(shape, torch.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_cosine_loss_bf16(shape):
    _compare_bf16(*_inputs(shape, torch.bfloat16))


def test_cosine_loss_fp16_and_non_contiguous():
    pred, target = _inputs((72, 6), torch.float16)
    pred, target = pred.t(), target.t()  # (6, 72), strided
    assert not pred.is_contiguous()
    loss, grad = _forward_backward(cosine_distill_loss, pred, target, "triton")
    ref, ref_grad = _forward_backward(cosine_distill_loss_reference, pred, target, "torch")
    assert grad.dtype == torch.float16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_loss_rows_wider_than_a_tile(monkeypatch, dtype):
    # 1000 wide in chunks of 256: two sweeps over each row, the last chunk partial.
    monkeypatch.setattr(cosine_loss, "_MAX_BLOCK_D", 256)
    assert cosine_loss._blocks(3, 1000, 256)[2] == 4
    inputs = _inputs((3, 1000), dtype)
    if dtype == torch.float32:
        _compare_fp32(*inputs)
    else:
        _compare_bf16(*inputs)


def test_cosine_loss_eps_semantics_at_tiny_norms():
    # eps = 0.1 clamps most rows below: pred norms ~0.01 and ~0.1-ish and 0, target norms
    # below eps and 0; the loss and gradient must follow F.cosine_similarity exactly.
    pred, target = _inputs((6, 48), torch.float32)
    pred = pred * torch.tensor([1e-3, 1e-2, 3e-2, 1.0, 0.0, 1e-2])[:, None]
    target = target * torch.tensor([1.0, 1e-3, 1.0, 1e-2, 1.0, 0.0])[:, None]
    _compare_fp32(pred, target, eps=0.1)
    _compare_fp32(pred * 1e-7, target * 1e-7)  # the default eps 1e-8, norms around it


def test_target_gets_no_gradient_and_grad_output_scales():
    pred, target = _inputs((5, 72), torch.float32)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    with use_backend("triton"):
        loss = cosine_distill_loss(pred, target)
    (3.0 * loss).backward()
    assert target.grad is None
    ref_pred = pred.detach().clone().requires_grad_(True)
    cosine_distill_loss_reference(ref_pred, target).backward()
    check_fp32(pred.grad, 3.0 * ref_pred.grad)


def test_no_grad_needed():
    pred, target = _inputs((5, 72), torch.float32)
    with use_backend("triton"), torch.no_grad():
        loss = cosine_distill_loss(pred, target)
    check_fp32(loss, cosine_distill_loss_reference(pred, target))
    assert not loss.requires_grad


# ----------------------------------------------------------------------------- compile, opcheck


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_cosine_loss_compiles_in_one_graph(backend_name):
    # fullgraph errors on any graph break. The Triton path goes through Inductor, which must
    # keep the custom op as an opaque call; the reference path only needs to trace.
    counter = CompileCounterWithBackend("inductor" if backend_name == "triton" else "aot_eager")
    compiled = torch.compile(cosine_distill_loss, fullgraph=True, backend=counter)
    pred, target = _inputs((2, 3, 48), torch.float32)
    loss, grad = _forward_backward(compiled, pred, target, backend_name)
    eager, eager_grad = _forward_backward(cosine_distill_loss, pred, target, backend_name)
    assert counter.frame_count == 1
    uses_kernel = any("rectok" in str(node.target) for gm in counter.graphs for node in gm.graph.nodes)
    assert uses_kernel == (backend_name == "triton")
    check_fp32(loss, eager)
    check_fp32(grad, eager_grad)


def test_opcheck_cosine_op():
    pred, target = _inputs((3, 48), torch.float32)
    pred.requires_grad_(True)
    torch.library.opcheck(torch.ops.rectok.cosine_distill_loss.default, (pred, target, 1e-8, True))


# ----------------------------------------------------------------------------- backend selection, errors


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(backend, "interpreter_active", lambda: False)
    pred, target = _inputs((2, 48), torch.float32)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cosine_distill_loss(pred, target)


def test_torch_backend_runs_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton op ran under the 'torch' backend")

    monkeypatch.setattr(cosine_loss, "_cosine_loss_op", fail)
    pred, target = _inputs((2, 48), torch.float32)
    with use_backend("torch"):
        torch.testing.assert_close(
            cosine_distill_loss(pred, target), cosine_distill_loss_reference(pred, target)
        )


def test_wrong_shapes_raise():
    pred, target = _inputs((2, 48), torch.float32)
    with pytest.raises(ValueError, match="cosine_distill_loss"):
        cosine_distill_loss(pred, target[:, :40])
    with pytest.raises(ValueError, match="cosine_distill_loss"):
        cosine_distill_loss(pred[0, 0], target[0, 0])  # 0-d: no feature dim


# ----------------------------------------------------------------------------- CUDA, realistic shapes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256, 1024), (64, 256, 768)])
def test_cosine_loss_cuda_realistic(shape, dtype):
    # Semantic decoder vs teacher features: 64 images x 256 tokens x 1024 (or 768) channels.
    pred, target = (x.cuda() for x in _inputs(shape, dtype))
    if dtype == torch.float32:
        _compare_fp32(pred, target)
    else:
        _compare_bf16(pred, target)
