"""The kernel benchmark cases of bench/kernels.py through pytest-benchmark.

    pytest bench/test_bench_kernels.py --benchmark-enable [--benchmark-json out.json]

Each case runs forward+backward of every implementation available on the device. With
benchmarks disabled (the project default) each runs once, as a smoke test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kernel_bench  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH = 64 if DEVICE.type == "cuda" else 1
CASES = kernel_bench.build_cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.shape.split(' (')[0]}]" for c in CASES])
@pytest.mark.parametrize("impl", ["eager", "compile", "ours"])
def test_kernel_fwd_bwd(benchmark, case, impl):
    if impl == "ours" and DEVICE.type != "cuda":
        pytest.skip("our Triton kernels are timed on CUDA only")
    impls = kernel_bench._implementations(case, DEVICE)
    fn = impls.get(impl) or impls.get(f"{impl}:sdpa")
    args = case.make(DEVICE, DTYPE, BATCH)
    run = kernel_bench._modes(fn, args, case.grad_args)["fwd+bwd"]
    benchmark.group = f"{case.op} {case.shape}"
    grads = benchmark(run)
    assert all(torch.isfinite(g).all() for g in grads)
