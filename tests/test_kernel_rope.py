"""Triton `apply_rope` and `rope_qkv` against their PyTorch references.

What this proves (on CPU through Triton's interpreter; on a GPU when one is present):
- forward outputs and input gradients match the references for head dims 48, 64, 72 and 128,
  sequence lengths 1, 11, 16 and 33 (the interpreter tile is 16 rows, so most are ragged),
  3 heads (fewer than the 4 heads one program handles), with a shared [L, 2D] table and a
  per-sample [B, L, 2D] table;
- the tables are the tokenizer's quirk kind: every channel has its own angle, so RoPE is not a
  rotation and its gradient is the transpose g*cos + rotate_half^T(g*sin), which a test shows
  differs from the inverse rotation (so the gradient checks can tell the two apart);
- fp32 agrees to 1e-5 relative; bf16 stays within 2x PyTorch's own bf16 error against an fp32
  reference on the same inputs (plus a small floor);
- rope_qkv returns contiguous [B, H, L, D] tensors; strided inputs work;
- the torch.library ops pass opcheck and compile with torch.compile(fullgraph=True);
- the "torch" backend runs the reference, and bad shapes raise ValueError.
"""

from __future__ import annotations

import math

import pytest
import torch
from rectok.kernels import (
    apply_rope,
    apply_rope_reference,
    rope_qkv,
    rope_qkv_reference,
    use_backend,
)
from rectok.kernels import rope as rope_mod
from rectok.kernels.rope import rotate_half

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIMS = (48, 64, 72)
LENGTHS = (1, 11, 16, 33)


def quirk_table(L: int, D: int, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """[cos | sin] with an independent random angle per (token, channel), like the tokenizer's
    table where interleaved pairs carry different frequencies. [L, 2D] or [batch, L, 2D]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (L, D) if batch is None else (batch, L, D)
    angle = (torch.rand(shape, generator=gen) * 2 - 1) * math.pi
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


def grad_of(fn, x: torch.Tensor, grads) -> torch.Tensor:
    x = x.detach().requires_grad_()
    out = fn(x)
    outs = out if isinstance(out, tuple) else (out,)
    (g,) = torch.autograd.grad(outs, x, grads)
    return g


def triton_apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    with use_backend("triton"):
        return apply_rope(x, table)


def triton_rope_qkv(qkv: torch.Tensor, table: torch.Tensor, heads: int):
    with use_backend("triton"):
        return rope_qkv(qkv, table, heads)


# ----------------------------------------------------------------------------- apply_rope


@pytest.mark.parametrize("per_sample", [False, True], ids=["table_LD", "table_BLD"])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_apply_rope_fp32(D: int, L: int, per_sample: bool) -> None:
    B, H = 2, 3
    table = quirk_table(L, D, batch=B if per_sample else None)
    x, g = randn(B, H, L, D), randn(B, H, L, D, seed=1)
    torch.testing.assert_close(
        triton_apply_rope(x, table), apply_rope_reference(x, table), rtol=1e-5, atol=1e-6
    )
    ours = grad_of(lambda t: triton_apply_rope(t, table), x, g)
    ref = grad_of(lambda t: apply_rope_reference(t, table), x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True], ids=["table_LD", "table_BLD"])
@pytest.mark.parametrize("D,L", [(48, 33), (64, 16), (72, 11), (72, 1)])
def test_apply_rope_bf16(D: int, L: int, per_sample: bool) -> None:
    B, H = 2, 3
    table = quirk_table(L, D, batch=B if per_sample else None)
    x, g = randn(B, H, L, D, dtype=torch.bfloat16), randn(B, H, L, D, dtype=torch.bfloat16, seed=1)
    assert_bf16_close(
        triton_apply_rope(x, table), apply_rope_reference(x, table), apply_rope_reference(x.float(), table)
    )
    assert_bf16_close(
        grad_of(lambda t: triton_apply_rope(t, table), x, g),
        grad_of(lambda t: apply_rope_reference(t, table), x, g),
        grad_of(lambda t: apply_rope_reference(t, table), x.float(), g.float()),
    )


def test_apply_rope_head_dim_128_and_strided_input() -> None:
    B, H, L, D = 1, 2, 11, 128
    table = quirk_table(L, D)
    x = randn(B, L, H, D).transpose(1, 2)  # [B, H, L, D] view with strides of [B, L, H, D]
    g = randn(B, H, L, D, seed=1)
    torch.testing.assert_close(
        triton_apply_rope(x, table), apply_rope_reference(x, table), rtol=1e-5, atol=1e-6
    )
    ours = grad_of(lambda t: triton_apply_rope(t, table), x, g)
    torch.testing.assert_close(
        ours, grad_of(lambda t: apply_rope_reference(t, table), x, g), rtol=1e-5, atol=1e-6
    )


def test_quirk_backward_is_transpose_not_inverse_rotation() -> None:
    """With per-channel angles the inverse rotation g*cos - rotate_half(g)*sin is wrong; ours is not it."""
    B, H, L, D = 1, 2, 11, 64
    table = quirk_table(L, D)
    g = randn(B, H, L, D, seed=1)
    ours = grad_of(lambda t: triton_apply_rope(t, table), randn(B, H, L, D), g)
    cos, sin = table[:, :D], table[:, D:]
    transpose = g * cos + rotate_half(g * sin).neg()  # rotate_half^T = -rotate_half on pairs
    inverse_rotation = g * cos - rotate_half(g) * sin
    torch.testing.assert_close(ours, transpose, rtol=1e-5, atol=1e-6)
    assert (ours - inverse_rotation).abs().max() > 0.1


# ----------------------------------------------------------------------------- rope_qkv


@pytest.mark.parametrize("per_sample", [False, True], ids=["table_LD", "table_BLD"])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_rope_qkv_fp32(D: int, L: int, per_sample: bool) -> None:
    B, H = 2, 3
    table = quirk_table(L, D, batch=B if per_sample else None)
    qkv = randn(B, L, 3 * H * D)
    grads = tuple(randn(B, H, L, D, seed=s) for s in (1, 2, 3))
    ours = triton_rope_qkv(qkv, table, H)
    for o, r in zip(ours, rope_qkv_reference(qkv, table, H)):
        assert o.shape == (B, H, L, D) and o.is_contiguous()
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    d_ours = grad_of(lambda t: triton_rope_qkv(t, table, H), qkv, grads)
    d_ref = grad_of(lambda t: rope_qkv_reference(t, table, H), qkv, grads)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "D,L,per_sample", [(48, 11, True), (64, 33, False), (72, 16, True), (128, 11, False)]
)
def test_rope_qkv_bf16(D: int, L: int, per_sample: bool) -> None:
    B, H = 2, 3
    table = quirk_table(L, D, batch=B if per_sample else None)
    qkv = randn(B, L, 3 * H * D, dtype=torch.bfloat16)
    grads = tuple(randn(B, H, L, D, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    for o, r, r32 in zip(
        triton_rope_qkv(qkv, table, H),
        rope_qkv_reference(qkv, table, H),
        rope_qkv_reference(qkv.float(), table, H),
    ):
        assert_bf16_close(o, r, r32)
    assert_bf16_close(
        grad_of(lambda t: triton_rope_qkv(t, table, H), qkv, grads),
        grad_of(lambda t: rope_qkv_reference(t, table, H), qkv, grads),
        grad_of(lambda t: rope_qkv_reference(t, table, H), qkv.float(), tuple(g.float() for g in grads)),
    )


def test_rope_qkv_strided_input_and_unused_output() -> None:
    """qkv as a column slice of a wider tensor (row stride != 3HD); v unused in the loss."""
    B, H, L, D = 2, 2, 11, 48
    table = quirk_table(L, D)
    qkv = randn(B, L, 3 * H * D + 8)[..., : 3 * H * D]
    loss = lambda q, k, v: (q * k).sum() + q.square().sum()  # noqa: E731
    ours = grad_of(lambda t: loss(*triton_rope_qkv(t, table, H)), qkv, torch.ones((), device=DEVICE))
    ref = grad_of(lambda t: loss(*rope_qkv_reference(t, table, H)), qkv, torch.ones((), device=DEVICE))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours[..., 2 * H * D :].abs().max() == 0


# ----------------------------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize(
    "op,make_args",
    [
        (rope_mod._apply_rope_op, lambda: (randn(2, 3, 11, 8).requires_grad_(), quirk_table(11, 8))),
        (rope_mod._apply_rope_backward_op, lambda: (randn(2, 3, 11, 8), quirk_table(11, 8, batch=2))),
        (rope_mod._rope_qkv_op, lambda: (randn(2, 11, 3 * 3 * 8).requires_grad_(), quirk_table(11, 8), 3)),
        (
            rope_mod._rope_qkv_backward_op,
            lambda: (*(randn(2, 3, 11, 8, seed=s) for s in range(3)), quirk_table(11, 8)),
        ),
    ],
    ids=["apply_rope", "apply_rope_backward", "rope_qkv", "rope_qkv_backward"],
)
def test_opcheck(op, make_args) -> None:
    torch.library.opcheck(op, make_args())


def test_apply_rope_compiles_fullgraph() -> None:
    B, H, L, D = 2, 3, 11, 8
    table, x = quirk_table(L, D, batch=B), randn(B, H, L, D)
    loss = lambda t: apply_rope(t, table).square().sum()  # noqa: E731
    with use_backend("triton"):
        compiled = torch.compile(loss, fullgraph=True)
        torch.testing.assert_close(grad_of(compiled, x, None), grad_of(loss, x, None), rtol=1e-5, atol=1e-6)


def test_rope_qkv_compiles_fullgraph() -> None:
    B, H, L, D = 2, 3, 11, 8
    table, qkv = quirk_table(L, D), randn(B, L, 3 * H * D)

    def loss(t: torch.Tensor) -> torch.Tensor:
        q, k, v = rope_qkv(t, table, H)
        return (q * k).sum() + v.square().sum()

    with use_backend("triton"):
        compiled = torch.compile(loss, fullgraph=True)
        torch.testing.assert_close(
            grad_of(compiled, qkv, None), grad_of(loss, qkv, None), rtol=1e-5, atol=1e-6
        )


# ----------------------------------------------------------------------------- dispatch and validation


def test_torch_backend_runs_the_reference(monkeypatch) -> None:
    def fail(*args):
        raise AssertionError("the Triton op ran under the 'torch' backend")

    monkeypatch.setattr(rope_mod, "_apply_rope_op", fail)
    monkeypatch.setattr(rope_mod, "_rope_qkv_op", fail)
    table, x, qkv = quirk_table(11, 8), randn(2, 3, 11, 8), randn(2, 11, 3 * 3 * 8)
    with use_backend("torch"):
        assert torch.equal(apply_rope(x, table), apply_rope_reference(x, table))
        for o, r in zip(rope_qkv(qkv, table, 3), rope_qkv_reference(qkv, table, 3)):
            assert torch.equal(o, r)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="table"):
        apply_rope(randn(1, 2, 11, 8), quirk_table(10, 8))
    with pytest.raises(ValueError, match="even"):
        apply_rope(randn(1, 2, 11, 7), torch.zeros(11, 14, device=DEVICE))
    with pytest.raises(ValueError, match="B, H, L, D"):
        apply_rope(randn(2, 11, 8), quirk_table(11, 8))
    with pytest.raises(ValueError, match="heads"):
        rope_qkv(randn(1, 11, 3 * 2 * 8), quirk_table(11, 8), 5)
    with pytest.raises(ValueError, match="table"):
        rope_qkv(randn(2, 11, 3 * 2 * 8), quirk_table(11, 8, batch=3), 2)


# ----------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.cuda
@pytest.mark.parametrize("H,D", [(12, 64), (16, 72), (16, 128)])
def test_rope_qkv_real_shapes_bf16(H: int, D: int) -> None:
    B, L = 2, 256
    table = quirk_table(L, D)
    qkv = randn(B, L, 3 * H * D, dtype=torch.bfloat16)
    grads = tuple(randn(B, H, L, D, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    for o, r, r32 in zip(
        triton_rope_qkv(qkv, table, H),
        rope_qkv_reference(qkv, table, H),
        rope_qkv_reference(qkv.float(), table, H),
    ):
        assert_bf16_close(o, r, r32)
    assert_bf16_close(
        grad_of(lambda t: triton_rope_qkv(t, table, H), qkv, grads),
        grad_of(lambda t: rope_qkv_reference(t, table, H), qkv, grads),
        grad_of(lambda t: rope_qkv_reference(t, table, H), qkv.float(), tuple(g.float() for g in grads)),
    )
    x = randn(B, H, L, D, dtype=torch.bfloat16)
    assert_bf16_close(
        triton_apply_rope(x, table), apply_rope_reference(x, table), apply_rope_reference(x.float(), table)
    )
