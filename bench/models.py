"""Model benchmark: training steps, sampling and data loading, in images per second.

Rows (official presets on a GPU, tiny presets on a CPU):
  train   tokenizer stage 1: RecTok forward in training mode (masking at the schedule's mean
          ratio 0.16, posterior sample, forward flow, both decoders), teacher features (on a GPU
          the real DINOv3 ViT-L/16 architecture with random weights; on a CPU the tiny teacher),
          MSE + KL + semantic (+ LPIPS/ConvNeXt perceptual when `lpips` is installed; the GAN,
          on for the second half of stage 1 only, is left out), backward, AdamW step;
  train   DiT^DH: x_t from cached latents, velocity MSE, backward, AdamW step;
  sample  150-point Euler with AutoGuidance (DiT^DH-XL + DiT^DH-S) and pixel decoding;
  data    PIL + DataLoader vs NVIDIA DALI (if importable) on a generated folder of JPEGs.
Modes: eager = as the release runs (bf16 autocast + SDPA, kernels "torch"); compile =
torch.compile (kernels "torch"); compile+graphs = torch.compile with CUDA graphs (train.py
--compile_mode reduce-overhead; for sampling the sampler's CUDA-graph replay); ours = our Triton
kernels; compile+ours = both. Triton needs
a GPU (its interpreter is no speed path), so CPU rows are eager and compile only. Compilation
uses train.py's --compile_scope (rectok/training/compiling.py; --compile-scope here).

FLOPs of one training step come from torch.utils.flop_counter.FlopCounterMode (eager, kernels
"torch"), so MFU = step FLOPs / step time / the matmul rate measured in the same run. Results go
to <out>/models-<date>-<device>.json and .md, with a ratio to the newest earlier result of the
same device in bench/results/ or <out>. --budget-s stops starting new rows once spent.

    python bench/models.py --quick                 # CPU: tiny presets; GPU: official presets
    python bench/models.py --parts train --modes eager compile
    pytest bench/test_bench_models.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rectok import kernels  # noqa: E402
from rectok.environment import device_name, environment  # noqa: E402
from rectok.models.dit import DiTDH, dit_config
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.training.compiling import COMPILE_SCOPES, compile_model

MODES = ("eager", "compile", "compile+graphs", "ours", "compile+ours")
PARTS = ("train", "sample", "data")
MASK_RATIO = 0.16  # E[max(0, U(-0.1, 0.4))]: a fixed ratio keeps shapes static for timing


def gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def autocast(device: torch.device):
    # bf16 on CUDA as the release trains; CPU runs stay in float32.
    return torch.autocast("cuda", dtype=torch.bfloat16) if gpu(device) else contextlib.nullcontext()


# ----------------------------------------------------------------------------- training cases
@dataclass
class TrainCase:
    name: str
    batch: int
    build: Callable[[], tuple[nn.Module, Callable[[nn.Module], None]]]  # -> (model, step(fwd))
    flops: float | None = None  # of one step, counted once (count_flops)


def tokenizer_case(device: torch.device) -> TrainCase:
    from rectok.models.teacher import Teacher
    from rectok.training.losses import LossWeights, PerceptualLoss, tokenizer_loss
    from rectok.training.optim import build_adamw

    on_gpu = gpu(device)
    base = tokenizer_config(
        "rectok-B" if on_gpu else "rectok-tiny", mask_ratio_min=MASK_RATIO, mask_ratio_max=MASK_RATIO
    )
    teacher_name = "DINOv3 ViT-L/16 (random)" if on_gpu else "tiny teacher"
    if on_gpu:
        try:
            teacher = Teacher(
                "dinov3", "random", image_size=base.img_size, token_patch=base.patch_size, device=device
            )
        except RuntimeError as err:  # a GPU machine's timm < 1.0.20 has no DINOv3 (it cannot be upgraded)
            if "Unknown model" not in str(err):
                raise
            # DINOv2 ViT-L/14 gives the same [B, 256, 1024] features.
            teacher = Teacher(
                "dinov2", "random", image_size=base.img_size, token_patch=base.patch_size, device=device
            )
            teacher_name = "DINOv2 ViT-L/14 (random; this timm has no DINOv3)"
    else:
        teacher = Teacher.tiny(image_size=base.img_size, token_patch=base.patch_size).to(device)
    cfg = replace(base, semantic_dim=teacher.feature_dim)
    perceptual = None
    if on_gpu:
        try:
            perceptual = PerceptualLoss("random").to(device)
        except Exception:  # lpips (or torchvision) missing: the row says "perceptual off"
            pass
    weights = LossWeights(perceptual=1.0 if perceptual is not None else 0.0, gan=0.0)
    batch = 64 if on_gpu else 4
    x = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=device) * 2 - 1

    def build():
        torch.manual_seed(0)
        with device:  # initialise on the device: hundreds of millions of weights init slowly on a CPU
            tok = RecTok(cfg).train()
        opt = build_adamw(tok, 1e-4, 1e-4, fused=on_gpu)
        gen = torch.Generator(device).manual_seed(0)

        def step(fwd: nn.Module) -> None:
            with autocast(device):
                out = fwd(x, gen)
                target = teacher(x)
                losses = tokenizer_loss(
                    x * 0.5 + 0.5,
                    out.images * 0.5 + 0.5,
                    weights,
                    perceptual=perceptual,
                    posterior=out.posterior,
                    semantic_pred=out.semantic,
                    semantic_target=target,
                )
            losses["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return tok, step

    extra = "" if perceptual is not None or not on_gpu else ", perceptual off (no lpips)"
    name = f"tokenizer {'rectok-B' if on_gpu else 'rectok-tiny'} + {teacher_name}{extra}"
    return TrainCase(name, batch, build)


def dit_case(device: torch.device) -> TrainCase:
    from rectok.training.optim import build_adamw

    on_gpu = gpu(device)
    preset = "dit-dh-xl" if on_gpu else "dit-dh-tiny"
    cfg = dit_config(preset)
    batch = 64 if on_gpu else 4
    g = torch.Generator(device).manual_seed(0)
    shape = (batch, cfg.in_channels, cfg.grid_size, cfg.grid_size)
    x1 = torch.randn(shape, generator=g, device=device)
    eps = torch.randn(shape, generator=g, device=device)
    t = torch.rand(batch, generator=g, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g, device=device)

    def build():
        torch.manual_seed(0)
        with device:
            dit = DiTDH(cfg).train()
        opt = build_adamw(dit, 2e-4, 0.0, fused=on_gpu)

        def step(fwd: nn.Module) -> None:
            x_t = kernels.flow_interpolate(eps, x1, t)
            with autocast(device):
                v = fwd(x_t, t, y)
            kernels.velocity_mse(v.float(), x1, eps).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return dit, step

    return TrainCase(f"DiT^DH {preset} (cached latents)", batch, build)


def backend_of(mode: str) -> str:
    return "triton" if "ours" in mode else "torch"


def sync(device: torch.device) -> None:
    if gpu(device):
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, target_s: float) -> float:
    """Median seconds per call after `warmup` calls (compilation, autotuning and graph capture happen
    there). Each call is timed on its own (synchronised): a training step or a batch of samples is
    long enough for that, and the median shrugs off calls slowed by other processes."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < target_s and len(times) < 50):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def count_flops(case: TrainCase) -> float:
    """FLOPs of one training step (forward + backward), eager with the PyTorch kernels; cached."""
    from torch.utils.flop_counter import FlopCounterMode

    if case.flops is None:
        model, step = case.build()
        with kernels.use_backend("torch"):
            step(model)  # optimizer state allocated outside the count
            with FlopCounterMode(display=False) as counter:
                step(model)
        case.flops = float(counter.get_total_flops())
    return case.flops


def train_rows(case: TrainCase, modes: Sequence[str], ctx: Bench) -> list[dict]:
    flops, flops_note = 0.0, None
    if any(ctx.has_time(m) for m in modes):
        try:
            flops = count_flops(case)
        except Exception as err:  # timings are still worth having without an MFU
            flops, flops_note = None, f"no FLOP count ({_short(err)})"
    rows = []
    for mode in modes:
        if not ctx.has_time(mode):
            rows.append(ctx.skipped("train", case.name, mode, case.batch))
            continue
        if "compile" in mode:
            # Dynamo does not guard on the kernel backend chosen while tracing: start each compiled
            # mode from an empty cache so "compile" and "compile+ours" never share graphs.
            torch._dynamo.reset()
        model, step = case.build()
        if "compile" in mode:  # +graphs: train.py --compile_mode reduce-overhead (CUDA graphs)
            compile_model(model, ctx.compile_scope, mode="reduce-overhead" if "graphs" in mode else "default")
        fwd = model
        with kernels.use_backend(backend_of(mode)):
            try:
                if gpu(ctx.device):
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                warmup = ctx.warmup + (1 if "compile" in mode else 0)  # the first compiled call traces
                sec = time_calls(functools.partial(step, fwd), ctx.device, warmup, ctx.target_s)
            except Exception as err:  # a mode that cannot run here (e.g. no C++ compiler for inductor)
                rows.append({**ctx.skipped("train", case.name, mode, case.batch), "note": _short(err)})
                continue
        tflops = flops / sec / 1e12 if flops is not None else None
        rows.append(
            {
                "part": "train",
                "model": case.name,
                "mode": mode,
                "batch": case.batch,
                "images_per_s": case.batch / sec,
                "ms": sec * 1e3,
                "TFLOPs": tflops,
                "MFU_%": 100 * tflops / ctx.ceilings["matmul_TFLOPs"] if tflops is not None else None,
                "peak_MB": torch.cuda.max_memory_allocated(ctx.device) / 2**20 if gpu(ctx.device) else None,
                "GFLOP_per_image": flops / case.batch / 1e9 if flops is not None else None,
                "note": flops_note,
            }
        )
    return rows


# ----------------------------------------------------------------------------- sampling
def sample_rows(modes: Sequence[str], ctx: Bench) -> list[dict]:
    from rectok.sampling.generate import Sampler, SamplerConfig, index_noise

    device, on_gpu = ctx.device, gpu(ctx.device)
    torch.manual_seed(0)
    with device:
        tok = RecTok(tokenizer_config("rectok-B" if on_gpu else "rectok-tiny", semantic_dim=0))
        C, g = tok.cfg.token_channels, tok.cfg.grid_size
        if on_gpu:
            dit, weak = (DiTDH(dit_config(p, in_channels=C, grid_size=g)) for p in ("dit-dh-xl", "dit-dh-s"))
        else:
            dit = DiTDH(dit_config("dit-dh-tiny", in_channels=C, grid_size=g))
            weak = DiTDH(
                dit_config("dit-dh-tiny", in_channels=C, grid_size=g, hidden_size=(64, 96), num_heads=(1, 3))
            )
    stats = (torch.zeros(C), torch.ones(C))
    batch, points = (64 if on_gpu else 4), 150
    steps = 149 if not ctx.quick else (8 if on_gpu else 4)  # quick: time a few steps, scale to 149
    nets = "dit-dh-xl + dit-dh-s" if on_gpu else "dit-dh-tiny + smaller weak"
    name = f"{nets} + decoder, AutoGuidance, {points} points"
    noise = index_noise(range(batch), (C, g, g), seed=0)
    labels = torch.arange(batch) % dit.num_classes
    rows = []
    # With our kernels the sampler also replays each Euler step's network as a CUDA graph.
    for mode in [m + "+graph" if "ours" in m else m for m in modes]:
        if not ctx.has_time(mode):
            rows.append(ctx.skipped("sample", name, mode, batch))
            continue
        cfg = SamplerConfig(
            num_points=steps + 1,
            guidance="autoguidance",
            scale=1.29,
            cuda_graph="on" if "graph" in mode else "off",
        )
        models = (dit, weak, tok)
        if "compile" in mode:  # fresh copies, compiled in place, traced with this mode's kernels
            torch._dynamo.reset()
            models = tuple(copy.deepcopy(m) for m in models)
            for m in models:
                compile_model(m, ctx.compile_scope)
        with kernels.use_backend(backend_of(mode)):
            try:
                sampler = Sampler(models[0], models[2], stats, cfg, weak=models[1], device=device)
                lat = sampler.latents(noise, labels)
                t_euler = time_calls(functools.partial(sampler.latents, noise, labels), device, 0, 0.0)
                t_decode = time_calls(functools.partial(sampler.decode, lat), device, 1, 0.0)
            except Exception as err:
                rows.append({**ctx.skipped("sample", name, mode, batch), "note": _short(err)})
                continue
        per_batch = t_euler * 149 / steps + t_decode
        rows.append(
            {
                "part": "sample",
                "model": name,
                "mode": mode,
                "batch": batch,
                "images_per_s": batch / per_batch,
                "ms": per_batch * 1e3,
                "note": None if steps == 149 else f"{steps} Euler steps timed, scaled to 149 (+ decode)",
            }
        )
    return rows


# ----------------------------------------------------------------------------- data loading
def make_image_folder(root: Path, count: int, seed: int = 0) -> Path:
    """ImageNet-layout JPEGs (root/train/<class>/*.JPEG) of ImageNet-like sizes (300-500 px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(count):
        folder = root / "train" / f"n{k % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(300, 500, size=2))
        # Smooth random images: compress like photos rather than like white noise.
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        img.save(folder / f"img_{k:05d}.JPEG", quality=90)
    return root


def epoch(loader, device: torch.device) -> tuple[int, float, float]:
    """One pass: (images after the first batch, seconds to the first batch, seconds after it).

    The first batch pays for worker start-up and (DALI) pipeline construction, a per-epoch cost
    that a real epoch of 1.28M images amortises; the rest is the steady decoding rate.
    """
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    sync(device)
    t1 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    sync(device)
    return n, t1 - t0, time.perf_counter() - t1


def data_rows(ctx: Bench, count: int) -> list[dict]:
    from rectok.data.dali import dali_available
    from rectok.data.loading import build_loader

    rows = []
    workers = 8 if gpu(ctx.device) else 2
    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(Path(tmp), count)
        for backend in ("pil", "dali"):
            name = f"{count} JPEGs (300-500 px) -> 256 px, batch 32, {workers} workers"
            if backend == "dali" and not dali_available():
                rows.append({**ctx.skipped("data", name, backend, 32), "note": "nvidia.dali not importable"})
                continue
            if not ctx.has_time(backend):
                rows.append(ctx.skipped("data", name, backend, 32))
                continue
            try:
                loader = build_loader(
                    root,
                    split="train",
                    batch_size=32,
                    image_size=256,
                    train=True,
                    backend=backend,
                    device=ctx.device,
                    num_workers=workers,
                    exclude=None,
                )
                n, startup, steady = epoch(loader, ctx.device)  # the files were just written: in page cache
            except Exception as err:
                rows.append({**ctx.skipped("data", name, backend, 32), "note": _short(err)})
                continue
            where = f"{ctx.device.type} decode" if backend == "dali" else "CPU decode"
            rows.append(
                {
                    "part": "data",
                    "model": name,
                    "mode": backend,
                    "batch": 32,
                    "images_per_s": n / steady,
                    "ms": steady * 1e3 * 32 / n,
                    "note": f"{where}; steady state after the first batch (which took {startup:.2f} s)",
                }
            )
    return rows


# ----------------------------------------------------------------------------- plumbing
def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"


class Bench:
    """Device, settings and the time budget shared by all rows."""

    def __init__(self, device: torch.device, quick: bool, budget_s: float, compile_scope: str) -> None:
        self.device, self.quick, self.compile_scope = device, quick, compile_scope
        self.warmup = 1 if quick else 3
        self.target_s = 1.0 if quick else 4.0
        self.start, self.budget_s = time.perf_counter(), budget_s
        self.ceilings = common.measure_ceilings(device, quick=quick)

    def has_time(self, mode: str) -> bool:
        left = self.budget_s - (time.perf_counter() - self.start)
        # A compiling row needs tens of seconds on official presets: do not start one at the end.
        return left > (45.0 if "compile" in mode and gpu(self.device) else 3.0)

    def skipped(self, part: str, model: str, mode: str, batch: int) -> dict:
        return {
            "part": part,
            "model": model,
            "mode": mode,
            "batch": batch,
            "note": "skipped: time budget spent",
        }


def device_tag(device: torch.device) -> str:
    return device_name(device).split(" (")[0].replace(" ", "-")


def previous_results(tag: str, dirs: Sequence[Path], exclude: Path) -> tuple[Path, dict] | None:
    """The newest earlier models-*-<tag>.json in `dirs` (by its recorded time, then file time)."""
    found = []
    for d in dirs:
        for path in d.glob(f"models-*-{tag}.json"):
            if path.resolve() == exclude.resolve():
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            when = data.get("meta", {}).get("environment", {}).get("time", "")
            found.append((when, path.stat().st_mtime, path, data))
    if not found:
        return None
    _, _, path, data = max(found, key=lambda f: (f[0], f[1]))
    return path, data


def add_ratios(rows: list[dict], previous: dict | None) -> None:
    if previous is None:
        return
    before = {(r["part"], r["model"], r["mode"]): r.get("images_per_s") for r in previous.get("rows", [])}
    for row in rows:
        old = before.get((row["part"], row["model"], row["mode"]))
        if old and row.get("images_per_s"):
            row["vs_prev"] = row["images_per_s"] / old


COLUMNS = [
    ("part", "part"),
    ("model", "model"),
    ("mode", "mode"),
    ("batch", "batch"),
    ("images_per_s", "images/s"),
    ("ms", "ms / step or batch"),
    ("TFLOPs", "TFLOP/s"),
    ("MFU_%", "MFU %"),
    ("peak_MB", "peak MB"),
    ("vs_prev", "x previous"),
    ("note", "note"),
]


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions, sampling scaled from few steps"
    )
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument(
        "--modes", nargs="+", default=None, choices=MODES, help="default: all the device runs"
    )
    parser.add_argument("--compile-scope", default="auto", choices=COMPILE_SCOPES, help="as train.py's")
    parser.add_argument(
        "--budget-s", type=float, default=1e9, help="start no new row after this many seconds"
    )
    parser.add_argument(
        "--data-images", type=int, default=None, help="JPEGs for the data rows (>= 96; 128 quick, else 512)"
    )
    parser.add_argument(
        "--out", type=Path, default=common.RESULTS_DIR, help="folder for the JSON and markdown"
    )
    args = parser.parse_args(argv)
    if args.data_images is not None and args.data_images < 96:
        parser.error("--data-images must be >= 96 (the steady-state rate needs batches after the first)")

    device = torch.device(args.device)
    on_gpu = gpu(device)
    modes = args.modes or (list(MODES) if on_gpu else ["eager", "compile"])
    if not on_gpu and any("ours" in m for m in modes):
        parser.error("modes with our Triton kernels need a GPU (the Triton interpreter is not a speed path)")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = Bench(device, args.quick, args.budget_s, args.compile_scope)
    print(f"device: {device_name(device)}; ceilings: {ctx.ceilings}")

    tag = device_tag(device)
    stem = f"models-{time.strftime('%Y-%m-%d')}-{tag}"
    out_json = args.out / f"{stem}.json"
    prev = previous_results(tag, [common.RESULTS_DIR, args.out], out_json)
    note = (
        "images/s per device. MFU = FlopCounterMode FLOPs of the step / time / the matmul rate measured "
        f"in this run ({ctx.ceilings['matmul']}). "
        + (
            f"x previous: ratio to {prev[0].name}."
            if prev
            else "x previous: no earlier result for this device."
        )
        + ("" if on_gpu else " CPU run: tiny presets, float32, eager and compile only (Triton needs a GPU).")
    )
    meta = {
        "device": device_name(device),
        "ceilings": ctx.ceilings,
        "environment": environment(),
        "quick": args.quick,
        "compile_scope": args.compile_scope,
        "note": note,
        "previous": str(prev[0]) if prev else None,
    }
    rows: list[dict] = []

    def flush() -> Path:
        add_ratios(rows, prev[1] if prev else None)
        return common.write_results(rows, meta, args.out, stem, COLUMNS)

    # Rows without compilation first, so a short budget still measures every model.
    cases = []
    for make in (tokenizer_case, dit_case) if "train" in args.parts else ():
        try:
            cases.append(make(device))
        except Exception as err:  # e.g. a teacher this timm cannot build: say so, time the rest
            name = make.__name__.removesuffix("_case")
            rows.append({"part": "train", "model": name, "mode": "-", "batch": None, "note": _short(err)})
            print(f"  train  {name}: cannot build the case: {_short(err)}")
    plain = [m for m in modes if "compile" not in m]
    compiled = [m for m in modes if "compile" in m]
    for group in (plain, compiled):
        if not group:
            continue
        for case in cases:
            t0 = time.perf_counter()
            rows += train_rows(case, group, ctx)
            flush()
            print(f"  train  {case.name:60s} {', '.join(group):22s} {time.perf_counter() - t0:6.1f} s")
        if "sample" in args.parts:
            t0 = time.perf_counter()
            rows += sample_rows(group, ctx)
            flush()
            print(f"  sample {'':60s} {', '.join(group):22s} {time.perf_counter() - t0:6.1f} s")
        if "data" in args.parts and group is plain:
            t0 = time.perf_counter()
            rows += data_rows(ctx, args.data_images or (128 if args.quick else 512))
            flush()
            print(f"  data   {'':60s} {'pil, dali':22s} {time.perf_counter() - t0:6.1f} s")
    path = flush()
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
