"""Shared benchmark plumbing: timing, machine ceilings, result files (the environment report is
rectok.environment, shared with training and sample.py).

Timing follows KERNELS.md: on CUDA, `triton.testing.do_bench` (CUDA events, warm-up, median
of many runs) over inputs larger than L2; on CPU, the median of repeated wall-clock runs.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of one call of `fn`."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=25 if quick else 100, rep=50 if quick else 300, return_mode="median"
            )
        )
    fn()  # warm-up (compilation, allocator)
    runs = []
    budget = 0.3 if quick else 1.5
    start = time.perf_counter()
    while len(runs) < 3 or (time.perf_counter() - start < budget and len(runs) < 50):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated during one call, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_ceilings(device: torch.device, *, quick: bool = False) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul rate on this device, now."""
    if device.type == "cuda":
        n = (1 << 28) if not quick else (1 << 26)  # 512 MiB / 128 MiB of bf16: far beyond L2
        src = torch.randn(n, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
        copy_gbs = 2 * src.numel() * src.element_size() / ms / 1e6
        m = 8192 if not quick else 4096
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda: a @ b, device, quick=quick)
        return {"copy_GBps": copy_gbs, "matmul_TFLOPs": 2 * m**3 / ms / 1e9, "matmul": f"bf16 {m}^3"}
    n = 1 << 24
    src = torch.randn(n)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
    copy_gbs = 2 * src.numel() * 4 / ms / 1e6
    m = 1024
    a, b = torch.randn(m, m), torch.randn(m, m)
    ms = time_ms(lambda: a @ b, device, quick=quick)
    return {"copy_GBps": copy_gbs, "matmul_TFLOPs": 2 * m**3 / ms / 1e9, "matmul": f"fp32 {m}^3"}


def write_results(
    rows: list[dict], meta: dict, out_dir: Path, stem: str, columns: list[tuple[str, str]]
) -> Path:
    """Write `<stem>.json` and `<stem>.md` (a markdown table of `columns`) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# {stem}",
        "",
        f"device: {meta.get('device')}  ",
        f"ceilings: {meta.get('ceilings')}  ",
        f"environment: {meta.get('environment')}",
        "",
    ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines.append("| " + " | ".join(title for _, title in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append(
                f"{value:.3g}" if isinstance(value, float) else ("-" if value is None else str(value))
            )
        lines.append("| " + " | ".join(cells) + " |")
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
