"""Command line of the studies: python -m rectok.study fsd [--quick] [--out DIR] [options].

python -m rectok.study fsd              # ~10 min on 2 quiet CPU cores (20 min budget) -> runs/study-fsd/
python -m rectok.study fsd --quick      # the smoke test's version (<1 min) -> runs/study-fsd-quick/
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from rectok.study.fsd import QUICK, StudyConfig, run_study


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rectok.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    p = sub.add_parser("fsd", help="linear probing along the flow, with and without FSD (issue 12)")
    d = StudyConfig()
    p.add_argument("--quick", action="store_true", help="tiny data and runs for the smoke test (<1 min)")
    p.add_argument("--out", type=Path, default=None, help="report folder (runs/study-fsd[-quick])")
    p.add_argument("--data", type=Path, default=None, help="texture set folder (default OUT/data, reused)")
    p.add_argument(
        "--seeds", type=_ints, default=None, help=f"comma-separated ({','.join(map(str, d.seeds))})"
    )
    p.add_argument(
        "--min-seeds", type=int, default=None, help=f"seed groups run whatever the budget ({d.min_seeds})"
    )
    p.add_argument(
        "--budget-min", type=float, default=None, help=f"time budget in minutes ({d.budget_s / 60:g})"
    )
    p.add_argument("--tok-steps", type=int, default=None, help=f"steps per tokenizer ({d.tok_steps})")
    p.add_argument(
        "--teacher-steps", type=int, default=None, help=f"teacher training steps ({d.teacher_steps})"
    )
    p.add_argument(
        "--taus", type=_floats, default=None, help="comma-separated probe taus (0,0.25,0.5,0.75,1)"
    )
    p.add_argument("--workers", type=int, default=None, help=f"tokenizers trained side by side ({d.workers})")
    p.add_argument("--threads", type=int, default=None, help=f"torch threads per worker ({d.threads})")
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra train.py option for every tokenizer, as --train-arg=--key=value (repeat)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    values = dict(QUICK) if args.quick else {}
    values["out"] = args.out or Path("runs/study-fsd-quick" if args.quick else "runs/study-fsd")
    given = dict(
        data=args.data, seeds=args.seeds, min_seeds=args.min_seeds, tok_steps=args.tok_steps,
        teacher_steps=args.teacher_steps, taus=args.taus, workers=args.workers, threads=args.threads,
        budget_s=None if args.budget_min is None else 60 * args.budget_min,
    )  # fmt: skip
    values.update({k: v for k, v in given.items() if v is not None})
    values["extra"] = [a for arg in args.train_arg for a in arg.split("=", 1)] if args.train_arg else []
    cfg = StudyConfig(**values)
    if not cfg.seeds or cfg.min_seeds < 1 or cfg.tok_steps < 1 or cfg.teacher_steps < 1 or cfg.workers < 1:
        raise ValueError("need at least one seed, and min-seeds, tok-steps, teacher-steps, workers >= 1")
    if any(not 0 <= t <= 1 for t in cfg.taus):
        raise ValueError(f"taus must lie in [0, 1], got {list(cfg.taus)}")
    return dataclasses.replace(cfg, min_seeds=min(cfg.min_seeds, len(cfg.seeds)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    command = "python -m rectok.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    run_study(cfg, command=command)
    return 0
