"""Comparison helpers shared by the kernel test files (tests/test_kernel_*.py).

The tolerance rules of KERNELS.md: float32 within ~1e-5 relative of the reference; bf16
compared with a float32 reference on the same values, allowed at most 2x the error of
PyTorch's own bf16 arithmetic on those inputs.
"""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_fp32(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * scale)


def check_bf16(
    ours: torch.Tensor, ref32: torch.Tensor, torch_bf16: torch.Tensor, same_inputs_ref: torch.Tensor
) -> None:
    """A bf16 kernel result against an fp32 reference on the same (bf16-valued) inputs.

    Its error is at most 2x PyTorch's own bf16 error (`torch_bf16`: plain bf16 arithmetic),
    plus a tiny floor, and it is within two bf16 ulps of the reference run on the bf16 inputs
    (`same_inputs_ref`: fp32 math, rounded once). Two, not one: loss gradients are stored in
    bf16 by the forward and rounded again when the backward scales them by grad_output.
    """
    assert ours.dtype == torch_bf16.dtype == same_inputs_ref.dtype
    ours_err = max_err(ours, ref32)
    torch_err = max_err(torch_bf16, ref32)
    floor = 1e-6 * ref32.abs().max().item()
    bound = 2 * torch_err + floor
    assert ours_err <= bound, f"ours {ours_err:.3g} vs torch bf16 {torch_err:.3g}"
    torch.testing.assert_close(ours.float(), same_inputs_ref.float(), rtol=2**-6, atol=floor)


def autograd_nodes(out: torch.Tensor) -> set[str]:
    """Names of all autograd nodes that produced `out` (proves which op really ran)."""
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names
