"""Compute a tokenizer's latent statistics for a dataset (USERS.md item 9, SPEC section 6).

The DiT^DH normalises latents per channel, `z_norm = (z - mean) / std`, with the mean and std of
the tokenizer's posterior mean over the training set (center crop, no flip). train.py computes
them at the start of a DiT^DH run; this tool does the same for any tokenizer (our run folder,
checkpoint or export, or an official-layout file) and any dataset, so that sample.py
(`--latent-stats FILE`) or a new DiT^DH run can use them:

    python -m rectok.training.latent_stats TOKENIZER DATA [--split train] [--out stats.safetensors]
        [--batch-size 64] [--num-workers 4] [--limit N] [--device cuda|cpu] [--bf16]
    torchrun --nproc-per-node 8 -m rectok.training.latent_stats TOKENIZER DATA ...   # ranks share the images

DATA is an ImageNet-layout folder (`DATA/<split>/<class>/*.JPEG`, or `DATA/<class>/...` when
there is no split folder) or a file list (`relpath label` per line). The output is the file
train.py writes as `latent_stats.safetensors`: tensors "mean" and "std" [C] (float32), with
metadata "config" {"token_channels", "grid"} and "tokenizer", plus the tokenizer's sha256, the
data source, the number of images and the image size.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from rectok.checkpoints import store
from rectok.checkpoints.loading import load_tokenizer
from rectok.data.loading import build_loader
from rectok.training import distributed as D
from rectok.training.latents import channel_statistics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m rectok.training.latent_stats",
        description="Per-channel mean / std of a tokenizer's posterior mean over a dataset "
        "(center crop, no flip), for DiT^DH latent normalisation.",
    )
    p.add_argument("tokenizer", help="tokenizer: run folder, ckpt_*.pt, .safetensors export or official file")
    p.add_argument("data", help="ImageNet-layout folder or file list")
    p.add_argument(
        "--split",
        default=None,
        help="split folder under DATA (default: 'train' when DATA/train exists, else DATA itself)",
    )
    p.add_argument("--out", default="latent_stats.safetensors", help="output .safetensors file")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and rank")
    p.add_argument("--num-workers", type=int, default=4, help="data loading workers per rank")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use N images spread evenly over the dataset (all classes) instead of all of them",
    )
    p.add_argument("--device", choices=D.DEVICES, default="auto")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (sums stay float64)")
    p.add_argument("--raw", action="store_true", help="use the raw weights of a training checkpoint, not EMA")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if Path(args.out).suffix != ".safetensors":
        p.error(f"--out must end in .safetensors (the format train.py writes), got {args.out}")
    return args


def _split(data: Path, split: str | None) -> str | None:
    """The split folder to read: as given, else 'train' if it exists, else none (DATA holds classes)."""
    if data.is_file():
        return None
    if split is not None:
        return split
    return "train" if (data / "train").is_dir() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"dataset not found: {data} (an ImageNet-layout folder or a file list)")
    info = D.init_distributed(args.device)
    try:
        loaded = load_tokenizer(args.tokenizer, use_ema=not args.raw)
        tok = loaded.model.to(info.device).eval().requires_grad_(False)
        cfg = tok.cfg
        split = _split(data, args.split)
        loader = build_loader(  # --limit: images spread evenly over the dataset, so every class counts
            data,
            split=split,
            batch_size=args.batch_size,
            image_size=cfg.img_size,
            train=False,
            hflip=False,
            rank=info.rank,
            world_size=info.world_size,
            num_workers=args.num_workers,
            device=info.device,
            spread=args.limit or 0,
        )
        bf16 = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
        mean, std, images = channel_statistics(tok, loader, info.device, bf16, progress=info.is_main)
        skipped = int(D.all_reduce_sum_(torch.tensor(loader.num_skipped, device=info.device)).item())
        if info.is_main:
            out = store.export_safetensors(
                args.out,
                {"mean": mean, "std": std},
                {"token_channels": cfg.token_channels, "grid": cfg.grid_size},
                tokenizer=str(loaded.path),
                tokenizer_sha256=store.sha256(loaded.path),
                tokenizer_layout=loaded.layout,
                data=str(data.resolve()),
                split=split,
                images=images,
                skipped_images=skipped,
                image_size=cfg.img_size,
                limit=args.limit,
                bf16=args.bf16,
            )
            print(
                f"latent statistics of {loaded.path} ({loaded.layout} layout, C = {cfg.token_channels}) "
                f"over {images} images of {data}{'/' + split if split else ''} at {cfg.img_size}px"
                f"{f', {skipped} unreadable skipped' if skipped else ''}\n"
                f"  mean: channel average {mean.mean():.4f}, range [{mean.min():.4f}, {mean.max():.4f}]\n"
                f"  std:  channel average {std.mean():.4f}, range [{std.min():.4f}, {std.max():.4f}]\n"
                f"wrote {out} (use with sample.py --latent-stats {out})"
            )
    finally:
        D.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
