"""Kernel benchmark: each fused op at the shapes of KERNELS.md, against the bar that matters.

For every op and shape it times, forward / backward / forward+backward:
  eager    the pure-PyTorch reference, eager mode;
  compile  torch.compile(reference), the real bar (KERNELS.md);
  ours     the functional API with the Triton backend (CUDA only), and for attention each
           backend (sdpa on our fused rope_qkv, triton, flash_attn / xformers if installed).
It reports milliseconds, achieved GB/s (TFLOP/s for attention), the share of the copy
bandwidth / matmul rate measured in the same run, and peak memory (CUDA).

On CPU only the reference paths are timed, at a small batch, to keep the script honest
and runnable anywhere: GPU figures need a GPU (bench/gpu_check.sh).

    python bench/kernels.py                  # all ops, default batch for the device
    python bench/kernels.py --ops rms_norm swiglu --batch 8 --quick
    pytest bench/test_bench_kernels.py --benchmark-enable   # the same cases via pytest-benchmark
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import rectok.kernels as K  # noqa: E402
from rectok.kernels.compiled_choice import choices_from_rows  # noqa: E402

from rectok.environment import device_name, environment  # noqa: E402


@dataclass
class Case:
    """One op at one shape. `make(device, dtype, batch)` returns the positional args."""

    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype, int], tuple]
    grad_args: tuple[int, ...]  # which args get gradients
    reference: Callable
    ours: Callable
    attention: tuple[int, int, int, int] | None = None  # (B, H, L, D) for FLOP counts
    backends: Sequence[str] = field(default_factory=tuple)  # extra attention backends


def _rand(shape, device, dtype, requires_grad=False):
    t = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    return t.requires_grad_(requires_grad)


def _rope_table(L: int, D: int, device) -> torch.Tensor:
    angle = torch.rand(L, D, device=device) * 6.28
    return torch.cat([angle.cos(), angle.sin()], -1)


def build_cases() -> list[Case]:
    cases: list[Case] = []
    L = 256
    cases.append(
        Case(
            "flow_interpolate",
            "B x 256 x 128 (tokenizer latent)",
            lambda d, t, B: (
                _rand((B, L, 128), d, t, True),
                _rand((B, L, 128), d, t),
                torch.rand(B, device=d),
            ),
            (0,),
            K.flow_interpolate_reference,
            K.flow_interpolate,
        )
    )
    cases.append(
        Case(
            "velocity_mse",
            "B x 128 x 16 x 16 (DiT latent)",
            lambda d, t, B: tuple(_rand((B, 128, 16, 16), d, t, i == 0) for i in range(3)),
            (0,),
            K.velocity_mse_reference,
            K.velocity_mse,
        )
    )
    cases.append(
        Case(
            "cosine_distill_loss",
            "B x 256 x 1024 (teacher features)",
            lambda d, t, B: (_rand((B, L, 1024), d, t, True), _rand((B, L, 1024), d, t)),
            (0,),
            K.cosine_distill_loss_reference,
            K.cosine_distill_loss,
        )
    )
    for width in (768, 1152, 2048):
        cases.append(
            Case(
                "rms_norm",
                f"B x 256 x {width}",
                lambda d, t, B, w=width: (_rand((B, L, w), d, t, True), _rand((w,), d, t, True)),
                (0, 1),
                K.rms_norm_reference,
                K.rms_norm,
            )
        )
    for width, per_token in ((1152, False), (2048, True)):
        mod_len = L if per_token else 1
        cases.append(
            Case(
                "rms_norm_modulate",
                f"B x 256 x {width}, shift/scale per {'token' if per_token else 'sample'}",
                lambda d, t, B, w=width, m=mod_len: (
                    _rand((B, L, w), d, t, True),
                    _rand((w,), d, t, True),
                    _rand((B, m, w), d, t, True),
                    _rand((B, m, w), d, t, True),
                ),
                (0, 1, 2, 3),
                K.rms_norm_modulate_reference,
                K.rms_norm_modulate,
            )
        )
    for hidden in (2048, 3072, 5461):
        cases.append(
            Case(
                "swiglu",
                f"B x 256 x 2*{hidden}",
                lambda d, t, B, h=hidden: (_rand((B, L, 2 * h), d, t, True),),
                (0,),
                K.swiglu_reference,
                K.swiglu,
            )
        )
    cases.append(
        Case(
            "apply_rope",
            "B x 12 x 256 x 64",
            lambda d, t, B: (_rand((B, 12, L, 64), d, t, True), _rope_table(L, 64, d)),
            (0,),
            K.apply_rope_reference,
            K.apply_rope,
        )
    )
    for heads, head_dim, label in (
        (12, 64, "ViT-B"),
        (16, 72, "DiT-XL trunk"),
        (16, 128, "DiT^DH head"),
        (4, 48, "semantic decoder"),
    ):
        make = lambda d, t, B, h=heads, hd=head_dim: (
            _rand((B, L, 3 * h * hd), d, t, True),
            _rope_table(L, hd, d),
            h,
        )
        cases.append(
            Case(
                "rope_qkv",
                f"B x 256 x 3*{heads}*{head_dim} ({label})",
                make,
                (0,),
                K.rope_qkv_reference,
                K.rope_qkv,
            )
        )
        cases.append(
            Case(
                "rope_attention",
                f"B x 256, {heads} x {head_dim} ({label})",
                make,
                (0,),
                K.rope_attention_reference,
                K.rope_attention,
                attention=(0, heads, L, head_dim),
                backends=("sdpa", "triton", "flash_attn", "xformers"),
            )
        )
    return cases


def _outputs(result) -> tuple[torch.Tensor, ...]:
    outs = result if isinstance(result, tuple) else (result,)
    return tuple(o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)


def _modes(fn: Callable, args: tuple, grad_args: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    """Closures for forward, backward (of a retained graph) and forward+backward."""
    inputs = [args[i] for i in grad_args]
    outs = _outputs(fn(*args))
    grads = [torch.randn_like(o) for o in outs]

    def forward():
        return fn(*args)

    def backward():
        return torch.autograd.grad(outs, inputs, grads, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(_outputs(fn(*args)), inputs, grads)

    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward_backward}


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _traffic(case: Case, args: tuple, result) -> dict[str, int]:
    """Fewest bytes each mode must move: inputs read once, outputs written once.

    Backward reads grad_output and the inputs it needs again, and writes one gradient per
    differentiable input.
    """
    outs = result if isinstance(result, tuple) else (result,)
    fwd = _nbytes(args) + _nbytes(outs)
    bwd = _nbytes(outs) + _nbytes(args) + _nbytes([args[i] for i in case.grad_args])
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _attention_flops(case: Case, batch: int) -> dict[str, float]:
    _, H, L, D = case.attention
    fwd = 4.0 * batch * H * L * L * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def _implementations(case: Case, device: torch.device) -> dict[str, Callable]:
    def with_backend(fn, name, **kwargs):
        def run(*args):
            with K.use_backend(name):
                return fn(*args, **kwargs)

        return run

    def compiled(fn, name, fullgraph=False, **kwargs):
        # The backend is chosen outside the compiled function: Dynamo cannot trace
        # ContextVar.set (use_backend), so a fullgraph compile of a function that enters
        # use_backend itself fails. Tracing reads the backend in force, as train.py does.
        target = functools.partial(fn, **kwargs) if kwargs else fn
        return with_backend(torch.compile(target, fullgraph=fullgraph, dynamic=False), name)

    impls = {
        "eager": with_backend(case.reference, "torch"),
        "compile": compiled(case.reference, "torch"),
    }
    if device.type != "cuda":
        return impls
    if case.backends:
        for backend in case.backends:
            impls[f"ours:{backend}"] = with_backend(case.ours, "triton", backend=backend)
        impls["compile:ours:sdpa"] = compiled(case.ours, "triton", backend="sdpa")
    else:
        impls["ours"] = with_backend(case.ours, "triton")
        impls["compile:ours"] = compiled(case.ours, "triton", fullgraph=True)
    return impls


def _time_implementation(case, name, fn, args, batch, dtype, traffic, flops, ceilings, device, quick):
    rows = []
    for mode, run in _modes(fn, args, case.grad_args).items():
        ms = common.time_ms(run, device, quick=quick)
        row = {
            "op": case.op,
            "shape": case.shape,
            "batch": batch,
            "dtype": str(dtype).replace("torch.", ""),
            "impl": name,
            "mode": mode,
            "ms": ms,
        }
        if flops:
            row["TFLOPs"] = flops[mode] / ms / 1e9
            row["ceiling_%"] = 100 * row["TFLOPs"] / ceilings["matmul_TFLOPs"]
        else:
            row["GBps"] = traffic[mode] / ms / 1e6
            row["ceiling_%"] = 100 * row["GBps"] / ceilings["copy_GBps"]
        if mode == "fwd+bwd":
            row["peak_MB"] = common.peak_memory_mb(run, device)
        rows.append(row)
    return rows


def run_case(
    case: Case, device: torch.device, dtype: torch.dtype, batch: int, ceilings: dict, quick: bool
) -> list[dict]:
    args = case.make(device, dtype, batch)
    rows = []
    traffic = _traffic(case, args, case.reference(*args))
    flops = _attention_flops(case, batch) if case.attention else None
    for name, fn in _implementations(case, device).items():
        try:
            rows += _time_implementation(
                case, name, fn, args, batch, dtype, traffic, flops, ceilings, device, quick
            )
        except Exception as err:  # noqa: BLE001 -- one broken backend must not lose the other rows
            message = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
            rows.append({"op": case.op, "shape": case.shape, "impl": name, "mode": "-", "error": message})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


COLUMNS = [
    ("op", "op"),
    ("shape", "shape"),
    ("impl", "impl"),
    ("mode", "mode"),
    ("ms", "ms"),
    ("GBps", "GB/s"),
    ("TFLOPs", "TFLOP/s"),
    ("ceiling_%", "% of ceiling"),
    ("peak_MB", "peak MB"),
    ("error", "note"),
]


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 on CUDA, 2 on CPU)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no new op after this many seconds"
    )
    parser.add_argument(
        "--out", type=Path, default=common.RESULTS_DIR, help="folder for the JSON and markdown"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (64 if device.type == "cuda" else 2)
    cases = [c for c in build_cases() if not args.ops or c.op in args.ops]
    if not cases:
        parser.error(f"no op matches {args.ops}; known: {sorted({c.op for c in build_cases()})}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ceilings = common.measure_ceilings(device, quick=args.quick)
    print(f"device: {device_name(device)}; ceilings: {ceilings}")
    note = (
        None
        if device.type == "cuda"
        else (
            "CPU run: only the reference paths (eager, torch.compile) are timed; "
            "GPU figures need a GPU (bench/gpu_check.sh)."
        )
    )
    if note:
        print(note)

    stamp = time.strftime("%Y-%m-%d")
    tag = device_name(device).split(" (")[0].replace(" ", "-")
    meta = {
        "device": device_name(device),
        "ceilings": ceilings,
        "environment": environment(),
        "dtype": str(dtype),
        "batch": batch,
        "note": note,
    }
    rows: list[dict] = []
    path = common.write_results(rows, meta, args.out, f"kernels-{stamp}-{tag}", COLUMNS)
    start = time.perf_counter()
    for case in cases:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(
                f"  budget of {args.budget_s:.0f} s spent: {case.op} [{case.shape}] and later cases not run"
            )
            meta["note"] = (note or "") + " Stopped early by --budget-s."
            break
        t0 = time.perf_counter()
        rows += run_case(case, device, dtype, batch, ceilings, args.quick)
        print(f"  {case.op:20s} {case.shape:45s} {time.perf_counter() - t0:6.1f} s")
        # Written after every case, so a run stopped by a time limit keeps what it measured.
        path = common.write_results(rows, meta, args.out, f"kernels-{stamp}-{tag}", COLUMNS)
    print(path.read_text())
    if device.type == "cuda":  # what `auto` should trace under torch.compile (kernels/compiled_choice.py)
        choices = {**choices_from_rows(rows), "device": meta["device"], "dtype": meta["dtype"]}
        choices_path = args.out / f"kernel-choices-{stamp}-{tag}.json"
        choices_path.write_text(json.dumps(choices, indent=2))
        print(f"compiled-kernel choices: {choices['choices']} -> {choices_path}")
    return path


if __name__ == "__main__":
    main()
