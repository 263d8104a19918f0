"""Command line: python -m rectok.eval {fid,is,stats,recon,probe} ...

  fid    SAMPLES --ref REF        gFID (and IS) of an ADM npz / image folder against ADM stats or images
  is     SAMPLES                  Inception Score (10 splits)
  stats  IMAGES --out REF.npz     ADM-format FID reference statistics (mu, sigma) of your own images
  recon  --checkpoint CKPT --data DIR      tokenizer PSNR / SSIM / rFID, JSON + PNG grid
  probe  --checkpoint CKPT [--checkpoint CKPT2] --train DIR --val DIR   linear probe along the flow

Every result file records the metric names, the Inception port and weights, and --meta KEY=VALUE
pairs (e.g. the sampling preset), so a number can be traced to its exact recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .fid import evaluate_samples, reference_stats, write_json
from .image_io import ImageSource, LabelledImageFolder
from .inception import LOGITS_FEATURES, POOL_FEATURES, load_inception
from .probe import ProbeConfig


def _meta(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise SystemExit(f"--meta expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _add_common(p: argparse.ArgumentParser, inception: bool = True) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=4, help="image decoding workers for folders")
    p.add_argument("--out", type=Path, default=None, help="result file (JSON) or folder (recon/probe)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="recorded in the result")
    p.add_argument("--no-progress", action="store_true")
    if inception:
        p.add_argument("--inception-weights", default=None, help="local FID Inception weights (.pth)")


def _finish(result: dict, args, default_name: str) -> None:
    result["meta"] = _meta(args.meta)
    print(json.dumps(result["metrics"], indent=2))
    if args.out is not None:
        path = args.out if args.out.suffix == ".json" else args.out / default_name
        write_json(result, path)
        print(f"wrote {path}", file=sys.stderr)


def cmd_fid(args, compute_fid: bool = True) -> None:
    device = _device(args.device)
    features = (POOL_FEATURES, LOGITS_FEATURES)
    net, info = load_inception(args.inception_weights, features, device)
    samples = ImageSource(args.samples, limit=args.limit, num_workers=args.num_workers)
    ref = args.ref if compute_fid else None
    result = evaluate_samples(
        samples,
        net,
        info,
        ref,
        name=getattr(args, "name", None),
        compute_is=not getattr(args, "no_is", False),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    _finish(result, args, "fid.json" if compute_fid else "is.json")


def cmd_stats(args) -> None:
    if args.out is None or args.out.suffix != ".npz":
        raise SystemExit("stats needs --out REF.npz (ADM-format statistics file to write)")
    device = _device(args.device)
    net, info = load_inception(args.inception_weights, (POOL_FEATURES,), device)
    src = ImageSource(
        args.images, limit=args.limit, center_crop=args.center_crop, num_workers=args.num_workers
    )
    stats, desc = reference_stats(src, net, args.batch_size, not args.no_progress)
    stats.save(args.out)
    meta = {"images": str(args.images), "content": desc, "center_crop": args.center_crop, "inception": info}
    write_json({**meta, "meta": _meta(args.meta)}, args.out.with_suffix(".json"))
    print(f"wrote {args.out} ({desc})", file=sys.stderr)


def _load_tokenizer(path: str, device: torch.device, img_size: int | None = None) -> torch.nn.Module:
    """Our checkpoints (run folder, ckpt_*.pt, *_ema.safetensors) or an official-layout file, built
    for `img_size` images (its position embeddings resampled) when given."""
    from rectok.checkpoints.loading import load_tokenizer

    return load_tokenizer(path, img_size=img_size).model.to(device).eval()


def _autocast(args) -> torch.dtype | None:
    return torch.bfloat16 if args.bf16 else None


def cmd_recon(args) -> None:
    from .reconstruction import evaluate_reconstruction

    if args.no_fid and args.ref is not None:
        raise SystemExit("--ref is the rFID reference; it cannot be combined with --no-fid")
    device = _device(args.device)
    tok = _load_tokenizer(args.checkpoint, device, args.image_size)
    size = args.image_size or tok.cfg.img_size
    data = LabelledImageFolder(args.data, size, limit=args.limit)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers)
    net, info = (None, None)
    if not args.no_fid:
        net, info = load_inception(args.inception_weights, (POOL_FEATURES,), device)
    ref = None
    if args.ref is not None:
        ref, _ = reference_stats(args.ref, net, args.batch_size, not args.no_progress)
    meta = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "image_size": size,
        **_meta(args.meta),
    }
    if args.ref is not None:
        meta["rfid_reference"] = str(args.ref)
    out_dir = args.out or Path("eval_recon")
    result = evaluate_reconstruction(
        tok,
        loader,
        inception=net,
        inception_info=info,
        reference=ref,
        name=args.name,
        device=device,
        rounding=args.rounding,
        autocast=_autocast(args),
        out_dir=out_dir,
        meta=meta,
        progress=not args.no_progress,
    )
    print(json.dumps(result["metrics"], indent=2))
    print(f"wrote {out_dir}/reconstruction.json and reconstruction_grid.png", file=sys.stderr)


def cmd_probe(args) -> None:
    from .probe import probe_along_flow, write_probe_report

    device = _device(args.device)
    labels = args.label or [Path(c).stem for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise SystemExit("give one --label per --checkpoint")
    cfg = ProbeConfig(weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed)
    taus = [float(t) for t in args.taus.split(",")]
    results = {}
    for label, ckpt in zip(labels, args.checkpoint):
        tok = _load_tokenizer(ckpt, device, args.image_size)
        size = args.image_size or tok.cfg.img_size
        loaders = [
            torch.utils.data.DataLoader(
                LabelledImageFolder(root, size, per_class=k),
                batch_size=args.batch_size,
                num_workers=args.num_workers,
            )
            for root, k in ((args.train, args.train_per_class), (args.val, args.val_per_class))
        ]
        results[label] = probe_along_flow(
            tok, *loaders, taus, cfg, device=device, autocast=_autocast(args), progress=not args.no_progress
        )
        results[label]["checkpoint"] = str(ckpt)
    out = args.out or Path("eval_probe")
    paths = write_probe_report(results, out, _meta(args.meta))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rectok.eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fid", help="FID (and IS) of samples against reference statistics or images")
    p.add_argument("samples", help="ADM npz (arr_0, uint8 [N, H, W, 3]) or folder of PNG/JPEG")
    p.add_argument(
        "--ref", required=True, help="npz with mu/sigma (e.g. VIRTUAL_imagenet256_labeled.npz) or images"
    )
    p.add_argument(
        "--name", default=None, help="metric name (default gFID-ADM against ADM's reference batch)"
    )
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--limit", type=int, default=None, help="use the first N samples")
    _add_common(p)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("is", help="Inception Score (10 splits) of samples")
    p.add_argument("samples")
    p.add_argument("--limit", type=int, default=None)
    _add_common(p)
    p.set_defaults(func=lambda a: cmd_fid(a, compute_fid=False))

    p = sub.add_parser("stats", help="FID reference statistics (ADM npz: mu, sigma) of a set of images")
    p.add_argument("images", help="ADM npz or folder of PNG/JPEG")
    p.add_argument(
        "--center-crop", type=int, default=None, help="ADM center crop of folder images to this size"
    )
    p.add_argument("--limit", type=int, default=None)
    _add_common(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("recon", help="tokenizer reconstruction PSNR / SSIM / rFID")
    p.add_argument(
        "--checkpoint", required=True, help="tokenizer checkpoint (official layout, .pth/.safetensors)"
    )
    p.add_argument(
        "--data", required=True, help="image folder (e.g. ImageNet val), ADM center-cropped on the fly"
    )
    p.add_argument("--image-size", type=int, default=None, help="default: the tokenizer's")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--ref", default=None, help="rFID reference statistics npz (default: the evaluated images)"
    )
    p.add_argument("--name", default="rFID", help="rFID metric name, e.g. rFID-val50k")
    p.add_argument(
        "--rounding", choices=("floor", "round"), default="floor", help="float -> uint8 before Inception"
    )
    p.add_argument("--no-fid", action="store_true", help="PSNR / SSIM only")
    p.add_argument(
        "--bf16", action="store_true", help="run the tokenizer under bf16 autocast (as the release)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_recon, batch_size=50)

    p = sub.add_parser("probe", help="linear probing along the flow (accuracy vs tau)")
    p.add_argument("--checkpoint", action="append", required=True, help="repeat to compare checkpoints")
    p.add_argument("--label", action="append", default=None, help="curve label per --checkpoint")
    p.add_argument("--train", required=True, help="train images root/<class>/...")
    p.add_argument("--val", required=True, help="held-out images root/<class>/...")
    p.add_argument("--train-per-class", type=int, default=None, help="first K train images per class")
    p.add_argument("--val-per-class", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--taus", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--weight-decay", type=float, default=ProbeConfig.weight_decay)
    p.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    _add_common(p, inception=False)
    p.set_defaults(func=cmd_probe, batch_size=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0
