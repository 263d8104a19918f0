"""`python -m rectok.data verify ROOT`: decode every file once and write the exclusion list that
both backends honour."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from rectok.data.sources import default_exclusion_path, resolve_samples
from rectok.data.transforms import load_rgb

log = logging.getLogger(__name__)


def _check_file(path: str) -> str | None:
    """None if PIL can verify and fully decode the file, else the error message."""
    try:
        with Image.open(path) as im:
            im.verify()  # structural check (catches e.g. broken PNG chunks)
        load_rgb(path)  # verify() does not decode JPEG data: truncation shows up only here
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def verify_dataset(
    source: str | Path,
    split: str | None = None,
    root: str | Path | None = None,
    out: str | Path | None = "auto",
    num_workers: int | None = None,
) -> list[str]:
    """Scan every image with PIL (verify + full decode); return the relative paths of the bad ones.

    out: where to write the exclusion list ("auto": default_exclusion_path; None: don't write).
    The file is written atomically, even when empty, so a clean scan is recorded too.
    """
    samples = resolve_samples(source, split, root)
    paths = [samples.path(i) for i in range(len(samples))]
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 16)
    if workers <= 1:
        errors = [_check_file(p) for p in paths]
    else:
        with ProcessPoolExecutor(workers) as pool:
            errors = list(pool.map(_check_file, paths, chunksize=64))
    bad = [rel for rel, err in zip(samples.relpaths, errors) if err is not None]
    for rel, err in zip(samples.relpaths, errors):
        if err is not None:
            log.warning("unreadable image %s: %s", rel, err)
    log.info("verified %d images under %s: %d unreadable", len(paths), samples.root, len(bad))
    if out is not None:
        out_path = default_exclusion_path(source, split) if out == "auto" else Path(out)
        tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
        header = f"# unreadable images under {samples.root} (relative paths), from rectok.data verify\n"
        tmp.write_text(header + "".join(rel + "\n" for rel in bad))
        os.replace(tmp, out_path)
        log.info("wrote exclusion list %s", out_path)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rectok.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ver = sub.add_parser("verify", help="scan a dataset with PIL and write the exclusion list used by DALI")
    ver.add_argument("source", help="dataset root (ImageNet layout) or a file list")
    ver.add_argument(
        "--split", default=None, help="split sub-folder, e.g. train (default: SOURCE is the split)"
    )
    ver.add_argument("--root", default=None, help="root of the relative paths of a file list")
    ver.add_argument("--out", default="auto", help="exclusion list path (default: beside the split / list)")
    ver.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    bad = verify_dataset(args.source, args.split, args.root, args.out, args.workers)
    print(f"{len(bad)} unreadable image(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
