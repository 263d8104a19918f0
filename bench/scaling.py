"""How each benchmark row's time grows with batch and resolution, eager and compiled, as a PNG.

Rows (the side-by-side's work, ours only, float32; rectok-tiny / dit-dh-tiny widths):
  tok-train  tokenizer stage-1 step: masked forward (ratio 0.16), MSE + KL + cosine to fixed
             teacher features, backward, AdamW (fused, as train.py);
  dit-train  DiT^DH step on latents of the tokenizer's grid (px / 16), batch as given;
  sample     one AutoGuidance Euler step (main + weak DiT^DH), latents only;
  infer      tokenizer encode + decode through the posterior mean.
Sweeps: batch at 64 px (128 px for the DiT rows, an 8x8 grid), and resolution 64 / 128 / 256 px
at a fixed batch. Variants: eager and compiled at train.py's default --compile_scope (modules);
at each row's base point also compiled per block (blocks): the measurement behind the default.
Every point is timed in interleaved rounds (bench/interleave.py); its compile time (first calls
minus a steady call) is reported apart.

    python bench/scaling.py [--quick] [--rounds 5] [--out bench/results]

Output: <out>/scaling-<date>-<device>.{json,md,png}. On 2 CPU cores the full sweep takes ~9 min;
it holds the timing lock of bench/side_by_side.py, so the two never time at once.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import interleave  # noqa: E402

from rectok import kernels  # noqa: E402
from rectok.environment import device_name, environment  # noqa: E402
from rectok.models import flow  # noqa: E402
from rectok.models.dit import DiTDH, dit_config  # noqa: E402
from rectok.models.tokenizer import RecTok, tokenizer_config  # noqa: E402
from rectok.sampling.euler import euler_sample  # noqa: E402
from rectok.training.compiling import compile_model  # noqa: E402
from rectok.training.dit_stage import flow_matching_loss  # noqa: E402
from rectok.training.optim import build_adamw  # noqa: E402

SEM_DIM = 384
MASK_RATIO = 0.16
LATENT_CHANNELS = 32  # of the DiT rows: the side-by-side's 8x8x32 latents at 128 px
DIT_WIDTHS = dict(hidden_size=(192, 256), depth=(4, 1), num_heads=(3, 4))
WEAK_WIDTHS = dict(hidden_size=(96, 128), depth=(2, 1), num_heads=(3, 4))
WORKS = ("tok-train", "dit-train", "sample", "infer")
# (work) -> (batches at the base resolution, base resolution, batch of the resolution sweep)
SWEEPS = {
    "tok-train": ((4, 8, 16, 32), 64, 8),
    "dit-train": ((4, 8, 16, 32), 128, 16),
    "sample": ((4, 16, 64), 128, 16),
    "infer": ((8, 32, 128), 64, 32),
}
RESOLUTIONS = (64, 128, 256)
QUICK = {
    "tok-train": ((2,), 64, 2),
    "dit-train": ((2,), 64, 2),
    "sample": ((2,), 64, 2),
    "infer": ((2,), 64, 2),
}


@dataclass
class Point:
    work: str
    px: int
    batch: int
    sweeps: tuple[str, ...]  # "batch" and / or "px": the curves of the plot this point lies on

    @property
    def base(self) -> bool:  # on both curves: also timed compiled per block
        return len(self.sweeps) == 2


def points(quick: bool) -> list[Point]:
    out = []
    for work, (batches, base_px, sweep_batch) in (QUICK if quick else SWEEPS).items():
        for b in batches:
            out.append(Point(work, base_px, b, ("batch", "px") if b == sweep_batch else ("batch",)))
        for px in (base_px,) if quick else RESOLUTIONS:
            if px != base_px:
                out.append(Point(work, px, sweep_batch, ("px",)))
    return out


# ----------------------------------------------------------------------------- the work
def _tokenizer(px: int) -> RecTok:
    torch.manual_seed(0)
    cfg = tokenizer_config(
        "rectok-tiny", img_size=px, semantic_dim=SEM_DIM, mask_ratio_min=MASK_RATIO, mask_ratio_max=MASK_RATIO
    )
    return RecTok(cfg)


def _dit(px: int, widths: dict, seed: int) -> DiTDH:
    torch.manual_seed(seed)
    cfg = dit_config("dit-dh-tiny", in_channels=LATENT_CHANNELS, grid_size=px // 16, num_classes=10, **widths)
    model = DiTDH(cfg)
    with torch.no_grad():  # the release's init zeroes adaLN and the output layer
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tok_train(px: int, batch: int) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], Callable]]:
    model = _tokenizer(px)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, px, px, generator=g) * 2 - 1
    target = torch.randn(batch, model.cfg.seq_len, SEM_DIM, generator=g)

    def step_of(m: torch.nn.Module) -> Callable:
        opt = build_adamw(m, 1e-4, 1e-4, fused=True)
        gen = torch.Generator().manual_seed(1)

        def step() -> None:
            out = m(x, generator=gen)
            mse = F.mse_loss(out.images, x)
            kl = out.posterior.kl().mean()
            cos = kernels.cosine_distill_loss(out.semantic, target)
            (mse + 1e-6 * kl + cos).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return model.train(), step_of


def dit_train(px: int, batch: int):
    model = _dit(px, DIT_WIDTHS, 0).train()
    g = torch.Generator().manual_seed(0)
    grid = px // 16
    x1 = torch.randn(batch, LATENT_CHANNELS, grid, grid, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    shift = flow.timestep_shift(grid, grid, LATENT_CHANNELS)

    def step_of(m: torch.nn.Module) -> Callable:
        opt = build_adamw(m, 2e-4, 0.0, fused=True)

        def step() -> None:
            flow_matching_loss(m, x1, y, shift).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return model, step_of


class _Pair(torch.nn.Module):
    """The main and the weak DiT^DH as one module, so that compile_model reaches both."""

    def __init__(self, main: DiTDH, weak: DiTDH) -> None:
        super().__init__()
        self.main, self.weak = main, weak


def sample_step(px: int, batch: int):
    pair = _Pair(_dit(px, DIT_WIDTHS, 0), _dit(px, WEAK_WIDTHS, 1)).eval()
    grid = px // 16
    noise = torch.randn(batch, LATENT_CHANNELS, grid, grid, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % 10

    def step_of(m: _Pair) -> Callable:
        main, weak = m.main, m.weak

        def step() -> None:  # 2 grid points: one Euler step
            euler_sample(
                main, noise, labels, num_points=2, shift=1.0, guidance="autoguidance", scale=1.5, weak=weak
            )

        return step

    return pair, step_of


def infer(px: int, batch: int):
    model = _tokenizer(px).eval()
    x = torch.rand(batch, 3, px, px, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, lambda m: lambda: m.reconstruct(x)


BUILD = {"tok-train": tok_train, "dit-train": dit_train, "sample": sample_step, "infer": infer}


def compile_pair_aware(model: torch.nn.Module, scope: str) -> None:
    if isinstance(model, _Pair):
        compile_model(model.main, scope)
        compile_model(model.weak, scope)
    else:
        compile_model(model, scope)


# ----------------------------------------------------------------------------- one point
def measure(point: Point, args: argparse.Namespace) -> dict:
    model, step_of = BUILD[point.work](point.px, point.batch)
    scopes = [] if args.no_compile else (["modules", "blocks"] if point.base else ["modules"])
    variants = {"eager": step_of(model)}
    compile_s = {}
    torch._dynamo.reset()
    for scope in scopes:
        compiled = copy.deepcopy(model)
        compile_pair_aware(compiled, scope)
        step = step_of(compiled)
        start = time.perf_counter()
        step()
        step()  # forward and backward graphs are compiled by now
        compile_s[scope] = time.perf_counter() - start
        variants[f"compiled ({scope})"] = step
    rounds = interleave.time_interleaved(
        variants, args.rounds, warmup=1, quiet_cores=args.quiet_cores, min_round_s=0.3 if args.quick else 0.5
    )
    summary = interleave.summarize(rounds, baseline="eager")
    row = {"work": point.work, "px": point.px, "batch": point.batch, "tokens": (point.px // 16) ** 2}
    row["sweeps"] = ",".join(point.sweeps)
    for name, v in summary["variants"].items():
        row[f"{name} ms"] = round(v["median_ms"], 2)
        if name != "eager":
            row[f"{name} speed-up"] = round(v["ratio"], 3)
    for scope, seconds in compile_s.items():
        steady = summary["variants"][f"compiled ({scope})"]["median_ms"] / 1e3
        row[f"compile ({scope}) s"] = round(max(0.0, seconds - 2 * steady), 1)
    row["rounds quiet"] = summary["rounds_quiet"]
    row["warning"] = summary["warning"]
    return row


# ----------------------------------------------------------------------------- output
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = [w for w in WORKS if any(r["work"] == w for r in rows)]
    fig, axes = plt.subplots(2, len(works), figsize=(4 * len(works), 7), squeeze=False)
    for col, work in enumerate(works):
        mine = [r for r in rows if r["work"] == work]
        by_batch = sorted((r for r in mine if "batch" in r["sweeps"]), key=lambda r: r["batch"])
        by_px = sorted((r for r in mine if "px" in r["sweeps"]), key=lambda r: r["px"])
        base_px, sweep_batch = by_batch[0]["px"], by_px[0]["batch"]
        for ax, series, key, label in (
            (axes[0][col], by_batch, "batch", f"batch ({base_px} px)"),
            (axes[1][col], by_px, "px", f"resolution, px (batch {sweep_batch})"),
        ):
            for variant, style in (("eager", "o-"), ("compiled (modules)", "s-")):
                xs = [r[key] for r in series if f"{variant} ms" in r]
                ys = [r[f"{variant} ms"] for r in series if f"{variant} ms" in r]
                if xs:
                    ax.plot(xs, ys, style, label=variant)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([r[key] for r in series], [str(r[key]) for r in series])
            ax.set_xlabel(label)
            ax.set_ylabel("ms per call")
            ax.set_title(work)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("RecTok on CPU: time per call vs batch and resolution (log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one tiny point per row, 2 rounds (a smoke test)")
    p.add_argument("--rounds", type=int, default=5, help="quiet interleaved rounds per point")
    p.add_argument("--works", default=",".join(WORKS), help=f"comma list from {', '.join(WORKS)}")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quiet-cores", type=float, default=0.5, help="other processes' cores that void a round")
    p.add_argument("--lock", default="/tmp/rectok-cpu-timing.lock", help="timing lock ('' for none)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="folder for the JSON, md and PNG")
    args = p.parse_args(argv)
    works = [w.strip() for w in args.works.split(",") if w.strip()]
    unknown = sorted(set(works) - set(WORKS))
    if unknown:
        p.error(f"unknown works {', '.join(unknown)}; choose from {', '.join(WORKS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.quick:
        args.rounds = min(args.rounds, 2)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    todo = [pt for pt in points(args.quick) if pt.work in works]
    rows = []
    started = time.perf_counter()
    with interleave.timing_lock(args.lock), kernels.use_backend("torch"):
        for i, pt in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {pt.work} {pt.px} px batch {pt.batch}", flush=True)
            rows.append(measure(pt, args))
            print("    " + ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k.endswith("ms")), flush=True)
    stem = f"scaling-{datetime.date.today().isoformat()}-{device.type}"
    meta = {
        "device": device_name(device),
        "environment": environment(device),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "load_average": interleave.load_average(),
        "note": (
            "ms per call, median of interleaved rounds; speed-up = eager / compiled; compile s = first two "
            "calls minus two steady calls. Float32, kernels 'torch'."
        ),
    }
    columns = [(k, k) for k in dict.fromkeys(k for r in rows for k in r if k != "warning")]
    common.write_results(rows, meta, args.out, stem, columns)
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md, .png")
    return rows


if __name__ == "__main__":
    main()
