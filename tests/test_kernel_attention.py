"""`rope_attention` backends against the reference softmax(q k^T / sqrt(D)) v with RoPE on q, k.

What this proves (on CPU through Triton's interpreter; on a GPU when one is present):
- backend "triton" (our flash attention, RoPE fused into the q/k tile loads, reading packed qkv)
  and backend "sdpa" (Triton rope_qkv + SDPA) match a float64 reference, forward and d_qkv,
  for head dims 48, 64, 72 (padded to 64/128 with masks) and 128, sequence lengths 1, 11, 16
  and 33 (ragged against the 16-wide interpreter tiles, and spanning several key blocks), batch
  and heads > 1, shared and per-sample (MAE-masked) tables with per-channel angles, strided qkv;
- fp32 agrees to ~1e-5 relative / 5e-5 absolute; bf16 stays within 2x PyTorch's own bf16 SDPA
  error against an fp32 reference on the same inputs (plus a small floor);
- the ops pass torch.library.opcheck and rope_attention(backend="triton") compiles with
  torch.compile(fullgraph=True);
- backend=None runs the reference under the "torch" kernels and Triton rope_qkv + SDPA under
  "triton"; unknown backends raise ValueError; "flash_attn" / "xformers" raise ImportError
  when the package is missing; "triton" on CPU without the interpreter raises RuntimeError.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from rectok.kernels import attention as attention_mod
from rectok.kernels import flash_attention as flash_mod
from rectok.kernels import rope as rope_mod
from rectok.kernels import rope_attention, rope_attention_reference, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIMS = (48, 64, 72)
LENGTHS = (1, 11, 16, 33)


def quirk_table(L: int, D: int, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """[cos | sin] with an independent random angle per (token, channel). [L, 2D] or [batch, L, 2D]."""
    gen = torch.Generator().manual_seed(seed)
    angle = (torch.rand((L, D) if batch is None else (batch, L, D), generator=gen) * 2 - 1) * math.pi
    return torch.cat([angle.cos(), angle.sin()], dim=-1).to(DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def assert_bf16_close(ours: torch.Tensor, torch_bf16: torch.Tensor, ref32: torch.Tensor) -> None:
    """Our bf16 error against the fp32 reference is at most 2x PyTorch's bf16 error (+ floor)."""
    err = (ours.float() - ref32).abs().max().item()
    torch_err = (torch_bf16.float() - ref32).abs().max().item()
    floor = 1e-3 * ref32.abs().max().item()
    assert err <= 2 * torch_err + floor, (
        f"bf16 error {err:.3e} vs PyTorch bf16 {torch_err:.3e} (floor {floor:.1e})"
    )


def forward_backward(fn, qkv: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    (d_qkv,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), d_qkv


def ours(backend: str, table: torch.Tensor, heads: int):
    def run(qkv: torch.Tensor) -> torch.Tensor:
        with use_backend("triton"):  # "sdpa" then runs the Triton rope_qkv
            return rope_attention(qkv, table, heads, backend=backend)

    return run


def reference(table: torch.Tensor, heads: int):
    return lambda qkv: rope_attention_reference(qkv, table, heads)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_rope_attention_fp32(D: int, L: int, backend: str) -> None:
    B, H = 2, 2
    table = quirk_table(L, D, batch=B if L % 2 else None)  # per-sample tables on the odd lengths
    qkv, grad = randn(B, L, 3 * H * D), randn(B, L, H * D, seed=1)
    out, d_qkv = forward_backward(ours(backend, table, H), qkv, grad)
    out64, d_qkv64 = forward_backward(reference(table, H), qkv.double(), grad.double())
    assert out.shape == (B, L, H * D) and out.dtype == torch.float32
    torch.testing.assert_close(out, out64.float(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(d_qkv, d_qkv64.float(), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("D,L", [(48, 33), (64, 16), (72, 11), (72, 1)])
def test_rope_attention_bf16(D: int, L: int, backend: str) -> None:
    B, H = 2, 2
    table = quirk_table(L, D, batch=B if L % 2 else None)
    qkv, grad = randn(B, L, 3 * H * D, dtype=torch.bfloat16), randn(B, L, H * D, dtype=torch.bfloat16, seed=1)
    out, d_qkv = forward_backward(ours(backend, table, H), qkv, grad)
    out_t, d_qkv_t = forward_backward(reference(table, H), qkv, grad)  # PyTorch's own bf16 path
    out32, d_qkv32 = forward_backward(reference(table, H), qkv.float(), grad.float())
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, out_t, out32)
    assert_bf16_close(d_qkv, d_qkv_t, d_qkv32)


def test_triton_head_dim_128_strided_qkv() -> None:
    """D = 128 (no padding) and qkv as a column slice of a wider tensor (row stride != 3HD)."""
    B, H, L, D = 1, 2, 16, 128
    table = quirk_table(L, D)
    qkv = randn(B, L, 3 * H * D + 32)[..., : 3 * H * D]
    grad = randn(B, L, H * D, seed=1)
    out, d_qkv = forward_backward(ours("triton", table, H), qkv, grad)
    out64, d_qkv64 = forward_backward(reference(table, H), qkv.double(), grad.double())
    torch.testing.assert_close(out, out64.float(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(d_qkv, d_qkv64.float(), rtol=1e-5, atol=5e-5)


# ----------------------------------------------------------------------------- torch.library / compile


def test_opcheck_flash_ops() -> None:
    B, H, L, D = 2, 2, 11, 16
    qkv, table = randn(B, L, 3 * H * D).requires_grad_(), quirk_table(L, D, batch=B)
    torch.library.opcheck(flash_mod._flash_op, (qkv, table, H))
    out, lse = flash_mod._flash_op(qkv.detach(), table, H)
    torch.library.opcheck(
        flash_mod._flash_backward_op, (randn(B, L, H * D, seed=1), qkv.detach(), table, out, lse, H)
    )


def test_triton_attention_compiles_fullgraph() -> None:
    B, H, L, D = 1, 2, 11, 16
    table, qkv = quirk_table(L, D), randn(B, L, 3 * H * D)
    loss = lambda t: rope_attention(t, table, H, backend="triton").square().sum()  # noqa: E731
    compiled = torch.compile(loss, fullgraph=True)
    _, d_compiled = forward_backward(compiled, qkv, torch.ones((), device=DEVICE))
    _, d_eager = forward_backward(loss, qkv, torch.ones((), device=DEVICE))
    torch.testing.assert_close(d_compiled, d_eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- backend choice


def _forbid(monkeypatch, module, name: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} should not run here")

    monkeypatch.setattr(module, name, fail)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU default is what is checked")
def test_default_on_cpu_with_torch_kernels_is_the_reference(monkeypatch) -> None:
    _forbid(monkeypatch, attention_mod, "flash_rope_attention")
    _forbid(monkeypatch, rope_mod, "_rope_qkv_op")
    B, H, L, D = 2, 2, 11, 16
    table, qkv = quirk_table(L, D), randn(B, L, 3 * H * D)
    for backend in ("torch", "auto"):
        with use_backend(backend):
            assert torch.equal(rope_attention(qkv, table, H), rope_attention_reference(qkv, table, H))


def test_default_under_triton_kernels_is_triton_rope_qkv_plus_sdpa(monkeypatch) -> None:
    _forbid(monkeypatch, attention_mod, "flash_rope_attention")
    calls = []
    real_op = rope_mod._rope_qkv_op
    monkeypatch.setattr(rope_mod, "_rope_qkv_op", lambda *args: calls.append(1) or real_op(*args))
    B, H, L, D = 2, 2, 11, 16
    table, qkv = quirk_table(L, D), randn(B, L, 3 * H * D)
    with use_backend("triton"):
        out = rope_attention(qkv, table, H)
    assert calls == [1]
    torch.testing.assert_close(out, rope_attention_reference(qkv, table, H), rtol=1e-5, atol=1e-5)


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="unknown attention backend"):
        rope_attention(randn(1, 4, 3 * 2 * 8), quirk_table(4, 8), 2, backend="cudnn")


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_missing_optional_backend_raises_clear_error(backend: str) -> None:
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(ImportError, match=f"{backend}.*not installed"):
        rope_attention(randn(1, 4, 3 * 2 * 8), quirk_table(4, 8), 2, backend=backend)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-without-interpreter error")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.setattr(attention_mod, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rope_attention(randn(1, 4, 3 * 2 * 8), quirk_table(4, 8), 2, backend="triton")


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="heads"):
        rope_attention(randn(1, 4, 3 * 2 * 8), quirk_table(4, 8), 5, backend="triton")
    with pytest.raises(ValueError, match="table"):
        rope_attention(randn(1, 4, 3 * 2 * 8), quirk_table(5, 8), 2, backend="triton")


# ----------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("H,D", [(12, 64), (16, 72), (16, 128)])
def test_rope_attention_real_shapes_bf16(H: int, D: int, backend: str) -> None:
    B, L = 2, 256
    table = quirk_table(L, D)
    qkv, grad = randn(B, L, 3 * H * D, dtype=torch.bfloat16), randn(B, L, H * D, dtype=torch.bfloat16, seed=1)
    out, d_qkv = forward_backward(ours(backend, table, H), qkv, grad)
    out_t, d_qkv_t = forward_backward(reference(table, H), qkv, grad)
    out32, d_qkv32 = forward_backward(reference(table, H), qkv.float(), grad.float())
    assert_bf16_close(out, out_t, out32)
    assert_bf16_close(d_qkv, d_qkv_t, d_qkv32)


@pytest.mark.cuda
@pytest.mark.parametrize("H,D", [(12, 64), (16, 72)])
def test_triton_attention_real_shapes_fp32(H: int, D: int) -> None:
    B, L = 2, 256
    table = quirk_table(L, D, batch=B)
    qkv, grad = randn(B, L, 3 * H * D), randn(B, L, H * D, seed=1)
    out, d_qkv = forward_backward(ours("triton", table, H), qkv, grad)
    out64, d_qkv64 = forward_backward(reference(table, H), qkv.double(), grad.double())
    torch.testing.assert_close(out, out64.float(), rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(d_qkv, d_qkv64.float(), rtol=1e-5, atol=5e-5)
