"""Side by side on a CPU: our code against the official RecTok release, same configs, same weights.

Both sides run in one process on the same shapes. Every item builds our model, converts its
weights into the release's module with rectok's official converters
(rectok.checkpoints.official_tokenizer / official_dit), checks that both compute the same thing
(max abs diff of forward outputs, losses and gradients, with the release's random draws replayed
on our side) and only then times them: interleaved rounds, the order rotating every round, rounds
during which other processes used the CPU kept apart (bench/interleave.py), under an flock that
cooperating timing jobs share. An item whose outputs differ by more than --tolerance is not timed.

Items (tiny configurations; float32; PyTorch reference kernels, the CPU default):
  tok64    tokenizer stage-1 train step at 64 px (16 tokens): encoder, pixel decoder and semantic
           decoder 192 wide / 3 blocks / 4 heads, C = 16, fixed teacher features [B, L, 384],
           batch 16; MSE + 1e-6 KL + cosine, backward, AdamW. Masking at the fixed ratio
           --mask-ratio on both sides (0.16 = the mean of max(0, U(-0.1, 0.4))), so both run the
           same token counts. Ours: rectok.training.tokenizer_stage.stage1_losses.
  tok128   the same at 128 px (64 tokens).
  dit      DiT^DH train step: 8x8 latents, C = 32, widths (192, 256), depth (4, 1), heads (3, 4),
           10 classes, batch 16; velocity MSE, backward, AdamW. Ours: dit_stage.flow_matching_loss.
  sample   150-point Euler (149 steps) with AutoGuidance (weak model (96, 128) / (2, 1) / (3, 4)),
           batch 16, latents only. Ours: rectok.sampling.generate.Sampler.latents; the release:
           DiTwDDTHead.generate (transport's sample_ode -> torchdiffeq's euler).
  infer64 / infer128   tokenizer encode + decode through the posterior mean, batch 32, eval mode.
Variants: official (eager), ours (eager), ours+compile (rectok.training.compiling.compile_model
at --compile-scope, as train.py --compile --compile_scope; for sampling SamplerConfig(compile=True), as
sample.py --compile). Reported:
median / min / max ms per variant, ours/official = median(official) / median(ours) (> 1: ours is
faster) with the spread of the per-round ratios, compile time apart from step time, the load
average; --profile adds torch.profiler op counts per step (host syncs, copies, casts) and the
ops whose counts differ most from the release's. Results: <out>/side-by-side-<date>-cpu.json, .md.

    HF_HUB_OFFLINE=1 PYTHONPATH=DEPS python bench/side_by_side.py --official OFFICIAL --profile
OFFICIAL: an extracted checkout of github.com/Shi-qingyu/RecTok (written against ee87aaf); DEPS: a
folder with the release's extra dependencies (pip install --target DEPS transformers==4.56.1
torchdiffeq). Nothing is written into either source tree.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from types import SimpleNamespace

# Read before torch is imported: torch writes its default into os.environ once it resolves the cache.
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import interleave  # noqa: E402
from side_by_side_items import BUILDERS, Prepared  # noqa: E402

from rectok.environment import device_name, environment  # noqa: E402
from rectok.training.compiling import COMPILE_SCOPES  # noqa: E402

ITEMS = ("tok64", "tok128", "dit", "sample", "infer64", "infer128")
RELEASE_FILES = ("models/rectok.py", "models/DDT.py", "transport/__init__.py")
RELEASE_DEPS = ("transformers", "torchdiffeq")
DEPS_HINT = "pip install --target DIR transformers==4.56.1 torchdiffeq and put DIR on PYTHONPATH"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="extracted official release (holds models/, transport/)")
    p.add_argument("--items", default=",".join(ITEMS), help=f"comma list from {', '.join(ITEMS)}")
    p.add_argument("--rounds", type=int, default=15, help="quiet interleaved rounds per item")
    p.add_argument(
        "--sample-rounds", type=int, default=None, help="rounds of the sample item (default --rounds)"
    )
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed calls per variant (+2 compiled, 1 sampling)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--mask-ratio", type=float, default=0.16, help="fixed MAE mask ratio on both sides")
    p.add_argument("--guidance-scale", type=float, default=1.5, help="AutoGuidance weight of the sample item")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="max abs diff above which an item is not timed"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the ours+compile variants")
    p.add_argument(
        "--compile-scope", default="modules", choices=COMPILE_SCOPES, help="train.py's --compile_scope"
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler op counts per variant")
    p.add_argument(
        "--lock",
        default=os.path.join(tempfile.gettempdir(), "rectok-cpu-timing.lock"),
        help="flock held while timing, shared by cooperating timing jobs ('' = none)",
    )
    p.add_argument(
        "--wait-quiet", type=float, default=300.0, help="wait up to this many s for a quiet machine"
    )
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=None,
        help="a round in which other processes used more cores than this is re-run (default: the cores "
        "this run leaves free + 0.3)",
    )
    p.add_argument(
        "--max-extra-rounds", type=int, default=None, help="re-runs of contended rounds (2x rounds)"
    )
    p.add_argument(
        "--min-round-s", type=float, default=0.5, help="calls per round are chosen to last this long"
    )
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="folder for the JSON and markdown")
    args = p.parse_args(argv)
    args.items = [i.strip() for i in args.items.split(",") if i.strip()]
    unknown = [i for i in args.items if i not in ITEMS]
    if unknown:
        p.error(f"unknown items {unknown}; choose from {', '.join(ITEMS)}")
    if args.quiet_cores is None:
        args.quiet_cores = max(0.3, (os.cpu_count() or 2) - args.threads + 0.3)
    return args


# ----------------------------------------------------------------------------- the release
def release_problem(path: str) -> str | None:
    """Why `path` cannot serve as the official checkout, in one line; None when it can."""
    root = Path(path)
    if not root.is_dir():
        return (
            f"--official {path}: no such folder (give an extracted checkout of github.com/Shi-qingyu/RecTok)"
        )
    missing = [f for f in RELEASE_FILES if not (root / f).is_file()]
    if missing:
        return f"--official {path} is not a RecTok release checkout: no {', '.join(missing)}"
    deps = [name for name in RELEASE_DEPS if importlib.util.find_spec(name) is None]
    if deps:
        return f"the official release needs {', '.join(deps)}, which this Python cannot import: {DEPS_HINT}"
    return None


def import_release(path: str) -> SimpleNamespace:
    """The release's models/rectok.py and models/DDT.py. Called after all our imports: the checkout
    has top-level packages (models, utils, torch_fidelity, ...) that must shadow nothing of ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = str(Path(path).resolve())
    sys.path.insert(0, root)
    # A bare package for models/: its __init__ imports every model family of the repository.
    package = types.ModuleType("models")
    package.__path__ = [os.path.join(root, "models")]
    sys.modules["models"] = package
    try:
        import models.DDT
        import models.rectok
    except ImportError as err:  # e.g. scipy (transport/) or timm missing, or another release layout
        sys.exit(f"side_by_side: importing the release from {path} failed: {err}")
    return SimpleNamespace(rectok=models.rectok, DDT=models.DDT)


def release_identity(path: str) -> dict:
    """Where the release came from: an extracted archive has no git, so a digest of its model files."""
    root = Path(path).resolve()
    digest = hashlib.sha256()
    for name in ("models/rectok.py", "models/DDT.py", "models/layers.py", "transport/transport.py"):
        if (root / name).is_file():
            digest.update((root / name).read_bytes())
    versions = {}
    for dist in RELEASE_DEPS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"path": str(root), "model_files_sha256": digest.hexdigest()[:16], "deps": versions}


# ----------------------------------------------------------------------------- run and report
def run_item(name: str, prep: Prepared, args: argparse.Namespace) -> dict:
    """Equality first; then, under the timing lock on a quiet machine, the profile and the rounds."""
    record = {"item": name, "description": prep.description, "config": prep.config, "checks": prep.checks}
    record["notes"] = prep.notes
    failed = {k: v for k, v in prep.checks.items() if not v <= args.tolerance}  # NaN fails too
    if failed:
        listed = ", ".join(f"{k} {v:.3g}" for k, v in failed.items())
        record["status"] = f"NOT TIMED: outputs differ by more than {args.tolerance:g} ({listed})"
        print(f"\n!!!!! {name}: {record['status']}\n", flush=True)
        return record
    compiled = "ours+compile" in prep.variants
    with interleave.timing_lock(args.lock) as lock_wait_s:
        waited_s, cores = interleave.wait_for_quiet(args.wait_quiet, args.quiet_cores)
        record["machine"] = {
            "lock_wait_s": round(lock_wait_s, 1),
            "quiet_wait_s": round(waited_s, 1),
            "foreign_cores_at_start": round(cores, 2),
            "load_before": interleave.load_average(),
        }
        if args.profile:
            profiled = prep.profile_variants or prep.variants
            profiles = interleave.profile_ops(profiled, prep.profile_calls, prep.profile_per_call)
            record["profile"] = {"unit": prep.profile_unit, "variants": profiles}
            record["profile"]["vs_official"] = interleave.op_differences(profiles)
        rounds = interleave.time_interleaved(
            prep.variants,
            args.sample_rounds or args.rounds if name == "sample" else args.rounds,
            warmup=prep.warmup if prep.warmup is not None else args.warmup,
            extra_warmup={"ours+compile": 2} if compiled and prep.warmup is None else None,
            quiet_cores=args.quiet_cores,
            max_extra_rounds=args.max_extra_rounds,
            min_round_s=args.min_round_s,
        )
        record["machine"]["load_after"] = interleave.load_average()
    record["timing"] = interleave.summarize(rounds)
    if compiled and prep.compile_first_s is not None:
        steady_s = record["timing"]["variants"]["ours+compile"]["median_ms"] / 1e3
        record["compile"] = {
            "first_calls_s": round(prep.compile_first_s, 1),
            "compile_s": round(prep.compile_first_s - prep.compile_first_calls * steady_s, 1),
        }
    record["status"] = "timed"
    return record


def _ms(row: dict | None) -> str:
    return "-" if row is None else f"{row['median_ms']:.1f} ({row['min_ms']:.1f}-{row['max_ms']:.1f})"


def _ratio(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['ratio']:.2f} ({row['ratio_round_min']:.2f}-{row['ratio_round_max']:.2f})"


def _worst_check(checks: dict) -> str:
    vs_release = {k: v for k, v in checks.items() if not k.startswith("compile_vs_eager")}
    if not vs_release:
        return "-"
    key = max(vs_release, key=lambda k: vs_release[k])
    return f"{vs_release[key]:.1e} ({key})"


def _op_summary(p: dict) -> str:
    return (
        f"{p['aten_ops']:.0f} aten ops, {p['host_syncs']:.1f} host syncs (_local_scalar_dense), "
        f"{p['copies']:.1f} copy_, {p['casts']:.1f} _to_copy, {p['clones']:.1f} clone/contiguous"
    )


def _deltas(pairs: list, fmt: str = "+g") -> str:
    return ", ".join(f"{k.removeprefix('aten::')} {v:{fmt}}" for k, v in pairs) or "none"


def item_lines(r: dict) -> list[str]:
    """The markdown section of one item (also what is printed after it)."""
    lines = [f"### {r['item']}: {r['description']}", "", f"config: `{json.dumps(r['config'])}`  "]
    lines.append(
        "equality (max abs diff): " + ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items()) + "  "
    )
    lines += [f"note: {n}  " for n in r["notes"]]
    if r["status"] != "timed":
        return lines + [f"**{r['status']}**", ""]
    t, m = r["timing"], r["machine"]
    lines.append(
        f"timing: {t['rounds_quiet']} quiet rounds of {t['rounds_run']} run, {t['calls_per_round']} "
        f"call(s) per variant per round; other processes used <= {t['foreign_cores_quiet_max']} cores "
        f"in the quiet rounds; contended rounds (their cores): {t['foreign_cores_contended'] or 'none'}; "
        f"load before {m['load_before']}, after {m['load_after']}"
        + (f"; **{t['warning']}**" if t["warning"] else "")
        + "  "
    )
    for name, v in t["variants"].items():
        extra = f", per-round ratio median {v['ratio_round_median']:.2f}" if "ratio" in v else ""
        lines.append(f"- {name}: {_ms(v)} ms{extra}")
    if "compile" in r:
        c = r["compile"]
        lines.append(
            f"- ours+compile first calls {c['first_calls_s']} s, of which compilation ~{c['compile_s']} s"
        )
    if "profile" in r:
        lines += [
            "",
            f"profile per {r['profile']['unit']} (torch.profiler, CPU; `at`: inside the optimizer, in "
            "the backward of an autograd node, or in the innermost function outside torch, file:line of "
            "its def):",
        ]
        for name, p in r["profile"]["variants"].items():
            lines.append(f"- {name}: {_op_summary(p)}, {p['self_cpu_ms']:.1f} ms self CPU")
            if p["has_optimizer"]:
                lines.append(f"  - outside the optimizer (model, loss, backward): {_op_summary(p['model'])}")
            for label, found in p["sites"].items():
                if found:
                    lines.append(f"  - {label} at: " + ", ".join(f"`{site}` {n:g}" for site, n in found))
            lines.append(
                "  - top self CPU: " + ", ".join(f"{k} {ms} ms x{n}" for k, ms, n in p["top_self_cpu"][:5])
            )
        for name, d in r["profile"]["vs_official"].items():
            lines.append(f"- {name} - official, op counts: {_deltas(d['op_counts'])}")
            if d["model_op_counts"] != d["op_counts"]:
                lines.append(f"  - outside the optimizer: {_deltas(d['model_op_counts'])}")
            lines.append(f"  - self CPU ms: {_deltas(d['self_cpu_ms'], '+.2f')}")
    return lines + [""]


def write_report(meta: dict, results: list[dict], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "items": results}, indent=1))
    env, rel = meta["environment"], meta["official"]
    git = env.get("git") or {}
    commit = str(git.get("commit", "?"))[:10] + (" (dirty)" if git.get("dirty") else "")
    deps = ", ".join(f"{k} {v}" for k, v in rel["deps"].items())
    lines = [
        f"# {stem}",
        "",
        f"ours: this checkout @ {commit}; official: {rel['path']} (model files sha256 "
        f"{rel['model_files_sha256']}); same weights, one process, float32, {meta['threads']} threads, "
        f"{meta['rounds']} interleaved rounds; Inductor cache: {meta['inductor_cache']}  ",
        f"machine: {meta['device']}, {meta['cpus']} CPUs; load average (1/5/15 min) at start "
        f"{meta['load_start']}, at end {meta.get('load_end', '-')}; busy processes at start: "
        f"{meta['busy_start'] or 'none'}  ",
        f"versions: python {env['python']}, torch {env['torch']}, timm {env['timm']}, "
        f"einops {env['einops']}, {deps}",
        "",
        "ms: median (min-max) over the quiet rounds; ratio = median(official) / median(variant), > 1 = "
        "faster than the release, in brackets the min-max of the per-round ratios; equality: the largest "
        "max abs diff between ours and the release (forward outputs, losses, gradients), checked before "
        "timing.",
        "",
        "| item | official ms | ours ms | ours/official | ours+compile ms | compiled/official "
        "| equality max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r.get("timing", {}).get("variants", {})
        cells = [_ms(v.get("official")), _ms(v.get("ours")), _ratio(v.get("ours"))]
        cells += [_ms(v.get("ours+compile")), _ratio(v.get("ours+compile"))]
        if r["status"] != "timed":
            cells = ["not timed"] + ["-"] * 4
        lines.append(f"| {r['item']} | " + " | ".join(cells) + f" | {_worst_check(r['checks'])} |")
    lines += ["", "## Items", ""]
    for r in results:
        lines += item_lines(r)
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    problem = release_problem(args.official)
    if problem:
        sys.exit(f"side_by_side: {problem}")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an earlier caller in this process
        pass
    fresh_cache = USER_INDUCTOR_CACHE is None
    if fresh_cache:
        # A fresh Inductor cache, so that the compile time is that of a cold compile: a warm on-disk
        # cache from an earlier run turns 16 s of compilation into 2.
        cache = tempfile.TemporaryDirectory(prefix="side-by-side-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    release = import_release(args.official)
    device = torch.device("cpu")
    meta = {
        "device": device_name(device),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "environment": environment(device),
        "official": release_identity(args.official),
        "rounds": args.rounds,
        "tolerance": args.tolerance,
        "mask_ratio": args.mask_ratio,
        "quiet_cores": args.quiet_cores,
        "lock": args.lock,
        "inductor_cache": "fresh (cold compiles)" if fresh_cache else os.environ["TORCHINDUCTOR_CACHE_DIR"],
        "load_start": interleave.load_average(),
        "busy_start": interleave.busy_processes(),
    }
    print(json.dumps({k: meta[k] for k in ("device", "official", "load_start", "busy_start")}, indent=1))
    stem = f"side-by-side-{time.strftime('%Y-%m-%d')}-cpu"
    results: list[dict] = []
    for name in args.items:
        start = time.perf_counter()
        print(
            f"\n== {name}: building, checking equality{'' if args.no_compile else ', compiling'}", flush=True
        )
        try:
            record = run_item(name, BUILDERS[name](args, release), args)
        except Exception as err:  # e.g. no C++ compiler for Inductor: say so, run the other items
            traceback.print_exc()
            record = {"item": name, "description": "", "config": {}, "checks": {}, "notes": []}
            record["status"] = (
                f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            )
        record["wall_s"] = round(time.perf_counter() - start, 1)
        results.append(record)
        print("\n".join(item_lines(record)), flush=True)
        write_report(meta, results, args.out, stem)  # after every item: a stopped run keeps what it has
    meta["load_end"] = interleave.load_average()
    meta["busy_end"] = interleave.busy_processes()
    path = write_report(meta, results, args.out, stem)
    print(path.read_text())
    print(f"wrote {path} and {path.with_suffix('.json')}")
    if any(r["status"] != "timed" for r in results):
        sys.exit(
            "side_by_side: some items were not timed (their outputs differ from the release's), see above"
        )
    return path


if __name__ == "__main__":
    main()
