"""Generate class-conditional samples with a DiT^DH and the RecTok pixel decoder (SPEC section 7).

    python sample.py                                  # the demo run's models (runs/demo-dit + runs/demo)
    python sample.py --dit runs/dit-dh-xl --weak runs/dit-dh-s --preset paper-autoguidance
    python sample.py --dit DiT.pth --tokenizer RecTok.pth --latent-stats stats.safetensors --cfg-scale 1.5
    torchrun --nproc-per-node 8 sample.py --dit ... --preset paper-autoguidance   # same images, 8x faster

Writes, under --out (default samples/): <name>.npz in ADM format (arr_0 uint8 [N, H, W, 3],
arr_1 int64 labels), <name>.png (a grid of the first images) and <name>.json (the preset, every
setting, the checkpoints with sha256, images/s, the environment). Sample i has label
classes[i % K] and noise from a generator seeded by (seed, i): the images do not depend on the
batch size or the number of GPUs. Score them with `python -m rectok.eval fid <name>.npz --ref ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rectok.checkpoints import loading, store
from rectok.environment import environment
from rectok.sampling import generate as gen
from rectok.sampling.images import save_grid
from rectok.training import distributed as D

DEFAULT_DIT = "runs/demo-dit"  # what `python train.py --stage dit` (tiny preset) writes
DEFAULT_TOKENIZER = "runs/demo"  # what `python train.py` (the demo) writes


@dataclass(frozen=True)
class Preset:
    """A named evaluation recipe (USERS.md item 1): written into every result file."""

    description: str
    num_points: int = 150
    guidance: str = "none"
    scale: float = 1.0
    per_class: int = 50


PRESETS = {
    "paper-autoguidance": Preset(
        "headline gFID with guidance (SPEC sections 1, 7): 150-point Euler, AutoGuidance w = 1.29 on the "
        "whole interval with DiT^DH-S (30 epochs) as the weak model, 50 samples per class (50k on ImageNet)",
        guidance="autoguidance",
        scale=1.29,
    ),
    "paper-noguidance": Preset("gFID without guidance (SPEC section 1): 150-point Euler, 50 per class"),
    "demo": Preset("a quick look: 150-point Euler, no guidance, 4 samples per class", per_class=4),
}
AUTOGUIDANCE_SCALE = 1.29  # the paper's weight when --scale is not given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dit", default=None, help=f"DiT^DH checkpoint, run folder or official file [{DEFAULT_DIT}]"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer checkpoint (default: the one the DiT^DH was trained on)"
    )
    p.add_argument("--weak", default=None, help="AutoGuidance weak model (DiT^DH-S checkpoint)")
    p.add_argument("--latent-stats", default=None, help="latent mean/std [C] file (official models)")
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="image size to sample at (default: the DiT^DH's training size): the tokenizer's position "
        "embeddings are resampled and the DiT^DH's sin-cos table regenerated for the new grid",
    )
    p.add_argument(
        "--preset", default="demo", choices=sorted(PRESETS), help="named recipe (options override)"
    )
    p.add_argument("--num-points", type=int, default=None, help="Euler grid points (steps + 1)")
    p.add_argument("--scale", type=float, default=None, help=f"AutoGuidance weight [{AUTOGUIDANCE_SCALE}]")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--shift", type=float, default=None, help="time-grid shift (default sqrt(h*w*C/4096))")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: all)")
    p.add_argument("--per-class", type=int, default=None, help="samples per class")
    p.add_argument("--num-samples", type=int, default=None, help="total samples (overrides --per-class)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="per GPU (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--device", default="auto", choices=D.DEVICES, help="auto: cuda if any")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--rounding", default="floor", choices=("floor", "round"), help="float -> uint8")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT^DH(s) and the decoder")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"), help="replay Euler steps")
    p.add_argument(
        "--no-ema",
        action="store_true",
        help="the DiT^DH's raw weights instead of its EMA (the tokenizer stays the EMA one whose latents "
        "the DiT^DH learned)",
    )
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder")
    p.add_argument("--name", default=None, help="file stem (default: <preset>-n<N>-seed<seed>)")
    p.add_argument("--grid", type=int, default=64, help="images in the PNG grid (0: none)")
    p.add_argument("--png-dir", type=Path, default=None, help="also write every sample as <index>.png here")
    p.add_argument("--no-progress", action="store_true")
    return p


# ----------------------------------------------------------------------------- settings
def resolve_guidance(args: argparse.Namespace, preset: Preset) -> tuple[str, float, tuple[float, float]]:
    if args.weak and args.cfg_scale is not None:
        raise ValueError("choose one guidance: --weak (AutoGuidance) or --cfg-scale (classifier-free)")
    if args.scale is not None and not args.weak:
        raise ValueError("--scale is the AutoGuidance weight and needs --weak CKPT; for CFG use --cfg-scale")
    if args.cfg_interval is not None and args.cfg_scale is None:
        raise ValueError("--cfg-interval needs --cfg-scale")
    if args.cfg_scale is not None:
        return "cfg", args.cfg_scale, tuple(args.cfg_interval or (0.0, 1.0))
    if args.weak:
        default = preset.scale if preset.guidance == "autoguidance" else AUTOGUIDANCE_SCALE
        return "autoguidance", args.scale if args.scale is not None else default, (0.0, 1.0)
    if preset.guidance == "autoguidance":
        raise ValueError(
            f"preset {args.preset!r} uses AutoGuidance: pass --weak <DiT^DH-S checkpoint> (train one with "
            "`python train.py --stage dit --preset dit-dh-s --dit.tokenizer_ckpt <tokenizer>`)"
        )
    return "none", 1.0, (0.0, 1.0)


def missing_dit_hint(explicit: bool) -> str:
    if explicit:
        return (
            "Train a generator with `python train.py --stage dit --preset dit-dh-xl --dit.tokenizer_ckpt "
            "<tokenizer checkpoint>` or pass an official DiT^DH checkpoint."
        )
    first = (
        ""
        if Path(DEFAULT_TOKENIZER).exists()
        else f"  python train.py              # -> {DEFAULT_TOKENIZER}\n"
    )
    return (
        "`python train.py` (the demo) trains only the tokenizer; sampling also needs a DiT^DH trained on "
        f"its latents. Run:\n{first}  python train.py --stage dit  # -> {DEFAULT_DIT}\n"
        "then `python sample.py` again (or pass --dit / --tokenizer for other checkpoints)."
    )


def load_models(args: argparse.Namespace):
    use_ema = not args.no_ema
    hint = missing_dit_hint(args.dit is not None)
    dit = loading.load_dit(args.dit or DEFAULT_DIT, use_ema=use_ema, hint=hint)
    tok_path = args.tokenizer
    if tok_path is None:
        if dit.layout == "official":
            raise ValueError(f"{dit.path} is an official DiT^DH checkpoint: pass its tokenizer (--tokenizer)")
        tok_path = dit.tokenizer_path or DEFAULT_TOKENIZER
    tok = loading.load_tokenizer(
        tok_path,
        use_ema=True,  # the DiT^DH stage trains on the EMA tokenizer's latents
        hint="Train one with `python train.py` (demo) or pass --tokenizer.",
        img_size=args.img_size or dit.raw.get("tokenizer_img_size"),
    )
    if tok.model.cfg.grid_size != dit.model.config.grid_size:  # a tokenizer loaded at another size
        dit = loading.load_dit(
            args.dit or DEFAULT_DIT, use_ema=use_ema, hint=hint, grid_size=tok.model.cfg.grid_size
        )
    check_trained_together(dit, tok)
    weak = None
    if args.weak:
        weak_hint = "Pass the AutoGuidance weak model (a DiT^DH-S)."
        weak = loading.load_dit(args.weak, use_ema=use_ema, hint=weak_hint, grid_size=tok.model.cfg.grid_size)
        if weak.latent_stats is not None and dit.latent_stats is not None:
            same = all(torch.allclose(a, b) for a, b in zip(weak.latent_stats, dit.latent_stats))
            if not same:  # guidance mixes the two velocities: both must live in one latent space
                raise ValueError(f"{weak.path} was trained with other latent statistics than {dit.path}")
    if args.latent_stats:
        stats, stats_from = loading.read_latent_stats(args.latent_stats), str(args.latent_stats)
    elif dit.latent_stats is not None:
        stats, stats_from = dit.latent_stats, str(dit.path)
    elif tok.latent_stats is not None:
        stats, stats_from = tok.latent_stats, str(tok.path)
        if (
            tok.stats_fingerprint not in (None, loading.tokenizer_fingerprint(tok.model))
            and not tok.resampled_from
        ):
            raise ValueError(
                f"the latent statistics in {tok.path} belong to other weights: pass --latent-stats"
            )
    else:
        raise ValueError(
            f"no latent statistics: neither {dit.path} nor {tok.path} carries them (official checkpoints "
            "never do). Pass --latent-stats FILE (.safetensors / .pt / .npz / .json with 'mean' and 'std' "
            "[C]: the per-channel statistics of the tokenizer's posterior mean over the training set)."
        )
    return dit, tok, weak, stats, stats_from


def check_trained_together(dit: loading.Loaded, tok: loading.Loaded) -> None:
    """A DiT^DH samples the latent space of the tokenizer it was trained on: refuse another one
    (our DiT^DH checkpoints record the tokenizer's weights fingerprint; official ones do not)."""
    expected = dit.raw.get("tokenizer_fingerprint")
    if not isinstance(expected, str) or tok.resampled_from is not None:
        return
    actual = loading.tokenizer_fingerprint(tok.model)
    if actual != expected:
        raise ValueError(
            f"{dit.path} was trained on the latents of tokenizer weights {expected} "
            f"({dit.tokenizer_path or 'path not recorded'}), but {tok.path} holds weights {actual} "
            "(raw instead of EMA weights, or another tokenizer): pass the tokenizer it was trained on "
            "with --tokenizer"
        )


def describe(loaded: loading.Loaded | None) -> dict | None:
    if loaded is None:
        return None
    return {"path": str(loaded.path), "layout": loaded.layout, "sha256": store.sha256(loaded.path)}


# ----------------------------------------------------------------------------- distributed
# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        D.shutdown()


def run(args: argparse.Namespace) -> dict | None:
    preset = PRESETS[args.preset]
    guidance, scale, interval = resolve_guidance(args, preset)
    info = D.init_distributed(args.device)  # torchrun sets WORLD_SIZE / RANK / LOCAL_RANK
    rank, world, device = info.rank, info.world_size, info.device
    dit, tok, weak, stats, stats_from = load_models(args)

    num_classes = dit.model.config.num_classes
    classes = args.classes if args.classes is not None else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range: the DiT^DH knows classes 0..{num_classes - 1}")
    per_class = args.per_class if args.per_class is not None else preset.per_class
    num_samples = args.num_samples if args.num_samples is not None else per_class * len(classes)
    labels = gen.class_labels(num_samples, classes)
    batch = args.batch_size or (64 if device.type == "cuda" else 16)
    if batch < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch}")

    cfg = gen.SamplerConfig(
        num_points=args.num_points or preset.num_points,
        guidance=guidance,
        scale=scale,
        interval=interval,
        # The shift the DiT^DH was trained with, when stored and at its grid (else from the grid).
        shift=args.shift or (dit.time_shift if dit.resampled_from is None else None),
        precision=args.precision,
        rounding=args.rounding,
        compile=args.compile,
        cuda_graph="off" if device.type != "cuda" and args.cuda_graph == "auto" else args.cuda_graph,
    )
    sampler = gen.Sampler(
        dit.model, tok.model, stats, cfg, weak=weak.model if weak else None, device=device, seed=args.seed
    )
    name = args.name or f"{args.preset}-n{num_samples}-seed{args.seed}"
    npz_path = args.out / f"{name}.npz"
    img = tok.model.cfg.img_size
    if rank == 0:
        print(
            f"sampling {num_samples} images ({len(classes)} classes) on {world} x {device}, batch {batch}: "
            f"{cfg.num_points}-point Euler, shift {sampler.shift:.4g}, guidance {guidance} (w = {scale:g}), "
            f"precision {sampler.dtype or torch.float32}, compile {cfg.compile}, "
            f"CUDA graphs {sampler.use_graphs}"
        )

    block = gen.rank_slice(num_samples, rank, world)
    shard = gen.open_shard(npz_path, rank, world, len(block), (img, img, 3))
    if args.png_dir is not None:
        args.png_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(block), unit="img", desc="sampling", disable=args.no_progress or rank != 0)

    def on_batch(indices: list[int], images: np.ndarray) -> None:
        if args.png_dir is not None:
            from PIL import Image

            for i, im in zip(indices, images):
                Image.fromarray(im).save(args.png_dir / f"{i:06d}.png")
        bar.update(len(indices))
        if world > 1:
            rate = (bar.format_dict["rate"] or 0.0) * world
            bar.set_postfix_str(f"~{rate:.1f} img/s over {world} ranks")

    start = time.perf_counter()
    pad = cfg.compile or sampler.use_graphs  # one batch shape: no recompilation, one graph
    gen.generate_block(sampler, block, labels, shard, batch, pad=pad, on_batch=on_batch)
    shard.flush()
    del shard
    elapsed = time.perf_counter() - start
    bar.close()
    D.barrier()
    if rank != 0:
        return None

    grid_path = None
    if args.grid > 0:
        first = np.load(gen.shard_path(npz_path, 0, world), mmap_mode="r")[: args.grid]
        if len(first) < min(args.grid, num_samples) and world > 1:  # rank 0's block is shorter than the grid
            parts = [np.load(gen.shard_path(npz_path, r, world), mmap_mode="r") for r in range(world)]
            first = np.concatenate([np.asarray(p) for p in parts])[: args.grid]
        grid_path = save_grid(np.asarray(first), args.out / f"{name}.png")
    gen.merge_shards(npz_path, world, labels)

    overrides = {
        k: {"preset": getattr(preset, k), "used": v}
        for k, v in (("num_points", cfg.num_points), ("guidance", guidance), ("per_class", per_class))
        if getattr(preset, k) != v
    }
    if guidance == preset.guidance and guidance != "none" and scale != preset.scale:
        overrides["scale"] = {"preset": preset.scale, "used": scale}
    if args.num_samples is not None:
        overrides["num_samples"] = {"preset": per_class * len(classes), "used": num_samples}
    result = {
        "preset": args.preset,
        "preset_settings": asdict(preset),
        "drifts_from_preset": bool(overrides),
        "overrides": overrides,
        "settings": {
            **asdict(cfg),
            "shift": sampler.shift,
            "num_samples": num_samples,
            "per_class": per_class,
            "classes": classes if len(classes) <= 32 else f"{len(classes)}: {classes[0]}..{classes[-1]}",
            "label_order": "label of sample i = classes[i % len(classes)]",
            "noise": "sample i: numpy default_rng([seed, i]).standard_normal(float32)",
            "seed": args.seed,
            "batch_size_per_rank": batch,
            "world_size": world,
            "precision_used": str(sampler.dtype or torch.float32),
            "cuda_graph_used": sampler.use_graphs,
            "ema": not args.no_ema,
        },
        "checkpoints": {
            "dit": describe(dit),
            "tokenizer": describe(tok),
            "weak": describe(weak),
            "latent_stats": stats_from,
        },
        "output": {
            "npz": str(npz_path),
            "grid": str(grid_path) if grid_path else None,
            "png_dir": str(args.png_dir) if args.png_dir else None,
            "num_images": num_samples,
            "image_shape": [img, img, 3],
        },
        "timing": {"wall_s": elapsed, "images_per_s": world * len(block) / elapsed if elapsed > 0 else None},
        "environment": environment(device),
        "notes": sampler.notes,
    }
    json_path = args.out / f"{name}.json"
    store.atomic_write(json_path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    json_path.chmod(0o644)  # atomic_write's temp file is private; a result file is for sharing
    print(f"wrote {npz_path} ({num_samples} images), {json_path}" + (f", {grid_path}" if grid_path else ""))
    print(
        f"score: python -m rectok.eval fid {npz_path} --ref <ADM reference npz> --meta preset={args.preset}"
    )
    return result


if __name__ == "__main__":
    main()
