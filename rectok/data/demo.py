"""A small built-in image dataset, made offline from photos shipped inside scikit-image.

`ensure_demo_dataset()` writes an ImageNet-layout folder (train/ and val/, one class per
source photo) of JPEGs that are random crops, scales, flips and colour jitters of those
photos. It exists so that `python train.py` shows a working run without downloading
anything: no network, deterministic for a given seed, and cheap (~400 images of 64-128 px).
Only photos bundled in the scikit-image wheel are used (those that need `pooch` downloads
are not).

The build is idempotent: a marker file holding the build settings is written last, so a
complete folder is reused and an interrupted or differently configured one is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

log = logging.getLogger(__name__)

MARKER = ".rectok_demo_complete.json"  # written last: the folder is complete
OWNER = ".rectok_demo"  # written first: the folder is ours to delete and rebuild
FORMAT_VERSION = 1


def _sources() -> dict[str, Callable[[], np.ndarray]]:
    """Class name -> loader of an RGB uint8 photo bundled with scikit-image (no download)."""
    from skimage import data  # a base dependency (its bundled photos need no download)

    return {
        "astronaut": data.astronaut,
        "cat": data.chelsea,
        "coffee": data.coffee,
        "galaxies": data.hubble_deep_field,
        "motorcycle": lambda: data.stereo_motorcycle()[0],
        "retina": data.retina,
        "rocket": data.rocket,
        "tissue": data.immunohistochemistry,
    }


def _augment(photo: Image.Image, rng: np.random.Generator, min_size: int, max_size: int) -> Image.Image:
    """One random view: a crop of random area and aspect, resized to 64-128 px, flipped, jittered."""
    out_w, out_h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    aspect = out_w / out_h
    src_w, src_h = photo.size
    # Largest box of this aspect inside the photo, shrunk to a random share of its area.
    box_w, box_h = (src_w, src_w / aspect) if src_w / aspect <= src_h else (src_h * aspect, src_h)
    shrink = np.sqrt(rng.uniform(0.15, 1.0))
    box_w, box_h = box_w * shrink, box_h * shrink
    left = rng.uniform(0, src_w - box_w)
    top = rng.uniform(0, src_h - box_h)
    img = photo.resize((out_w, out_h), Image.LANCZOS, box=(left, top, left + box_w, top + box_h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.75, 1.25))
    return img


def ensure_demo_dataset(
    root: str | Path = "data/demo",
    *,
    train_per_class: int = 40,
    val_per_class: int = 10,
    min_size: int = 64,
    max_size: int = 128,
    seed: int = 0,
) -> Path:
    """Build (or reuse) the demo dataset under `root`; returns `root`.

    Layout: root/{train,val}/<class>/<class>_<k>.JPEG with 8 classes (sorted names = labels).
    Call it from one process (e.g. rank 0, then a barrier) when training distributed.
    """
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    if train_per_class < 1 or val_per_class < 0:
        raise ValueError("need train_per_class >= 1 and val_per_class >= 0")
    root = Path(root)
    sources = _sources()
    config = dict(
        version=FORMAT_VERSION,
        classes=sorted(sources),
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        min_size=min_size,
        max_size=max_size,
        seed=seed,
    )
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == config:
                log.info("demo dataset already complete at %s", root)
                return root
        except json.JSONDecodeError:
            pass
    if ((root / "train").exists() or (root / "val").exists()) and not (root / OWNER).exists():
        raise ValueError(
            f"{root} holds train/ or val/ folders that the demo builder did not make; "
            "choose another root for the demo dataset"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / OWNER).write_text("made by rectok.demo_data.ensure_demo_dataset; safe to delete\n")
    marker.unlink(missing_ok=True)
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)

    log.info("building the demo dataset at %s (%d classes)", root, len(sources))
    for class_id, name in enumerate(sorted(sources)):
        photo = Image.fromarray(sources[name]()).convert("RGB")
        for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                rng = np.random.default_rng([seed, split_id, class_id, k])
                img = _augment(photo, rng, min_size, max_size)
                img.save(folder / f"{name}_{k:04d}.JPEG", format="JPEG", quality=90)

    tmp = root / (MARKER + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, marker)
    return root
