"""A procedural labelled image set for the FSD study: 10 texture classes in random colours.

Why not the demo photos: the demo's 8 classes are crops of 8 photos, so colour statistics alone
separate them and a linear probe on any latent is near 100% at tau = 0. Here the class is the
*pattern* only (stripes, checker, dots, grid, ...): the two colours, orientation, frequency, phase,
a smooth illumination gradient, clutter strokes and pixel noise are drawn independently of the
label, so the mean colour of an image says nothing about its class and a probe on mean-pooled
latents has to read local structure, which a pixel autoencoder need not make linearly readable.
scikit-learn's digits (8x8 px) were the other offline option, but at the tokenizer's 64 px and
16 px patches they would be a few blurry tokens.

Textures, not shapes: a first version with 10 rotated shapes on cluttered backgrounds was not
learnable by the study's teacher (Teacher.tiny, a 2-block 64-wide ViT with 16 px patches): 15%
val accuracy after 2000 steps. Patterns that repeat within a patch are what such a ViT learns in
a few hundred steps on a CPU.

Everything is drawn with numpy from (seed, split, class, index) and written as PNG in the ImageNet
folder layout root/{train,val}/<class>/<class>_<k>.png, which train.py (`--data.path root`) and
the probes read. The build is idempotent: a marker holding the build settings is written last and
a complete folder with the same settings is reused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = ".rectok_textures_complete.json"
OWNER = ".rectok_textures"
FORMAT_VERSION = 1

# (u, v): pattern coordinates (rotated image frame, [-1.4, 1.4]); f: frequency; ph: phase;
# (r, theta): polar coordinates about a random centre; rng for the random patterns. -> bool mask.
Pattern = Callable[..., np.ndarray]


def _blobs(u, v, f, ph, r, theta, rng):
    coarse = rng.standard_normal((6, 6))  # smooth random field, thresholded at its median
    img = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize(u.shape[::-1], Image.BICUBIC))
    return img > np.median(img)


def _bricks(u, v, f, ph, r, theta, rng):
    row = np.floor((f * v + ph) / np.pi)  # courses between the horizontal mortar lines
    mortar_h = np.abs(np.sin(f * v + ph)) < 0.25
    mortar_v = np.abs(np.sin(0.5 * f * u + row * np.pi / 2)) < 0.15
    return mortar_h | mortar_v


PATTERNS: dict[str, Pattern] = {
    "blobs": _blobs,
    "bricks": _bricks,
    "checker": lambda u, v, f, ph, r, theta, rng: (np.sin(f * u + ph) > 0) ^ (np.sin(f * v) > 0),
    "dots": lambda u, v, f, ph, r, theta, rng: np.sin(f * u + ph) ** 2 + np.sin(f * v) ** 2 < 0.5,
    "grid": lambda u, v, f, ph, r, theta, rng: np.abs(np.sin(f * u + ph) * np.sin(f * v)) < 0.15,
    "pinwheel": lambda u, v, f, ph, r, theta, rng: np.sin(np.round(f) * theta + ph) > 0,
    "rings": lambda u, v, f, ph, r, theta, rng: np.sin(1.4 * f * r + ph) > 0,
    "stripes": lambda u, v, f, ph, r, theta, rng: np.sin(f * u + ph) > 0,
    "waves": lambda u, v, f, ph, r, theta, rng: np.sin(f * u + 2.5 * np.sin(0.6 * f * v) + ph) > 0,
    "zigzag": lambda u, v, f, ph, r, theta, rng: np.sin(f * v + 3 * np.abs((f * u / np.pi) % 2 - 1) + ph) > 0,
}
CLASSES = tuple(sorted(PATTERNS))  # sorted names = labels, as ImageFolder assigns them


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, 3)


def _clutter(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, count: int) -> None:
    """Thin random line segments in random colours (label-independent distractors), in place."""
    for _ in range(count):
        p = rng.uniform(-1, 1, 2)
        d = rng.uniform(-0.8, 0.8, 2)
        t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / (d @ d + 1e-9), 0, 1)
        dist = np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1])
        img[dist < rng.uniform(0.02, 0.05)] = _colour(rng)


def render(
    label: int, rng: np.random.Generator, size: int = 64, clutter: int = 3, noise: float = 0.04
) -> np.ndarray:
    """One image of class CLASSES[label] as uint8 [size, size, 3]."""
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(-axis, axis, indexing="ij")  # image frame in [-1, 1], y up
    angle, f, ph = rng.uniform(0, np.pi), rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    cx, cy = rng.uniform(-0.6, 0.6, 2)
    r, theta = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    mask = PATTERNS[CLASSES[label]](u, v, f, ph, r, theta, rng)
    a, b = _colour(rng), _colour(rng)
    while np.abs(a - b).max() < 0.35:  # keep the pattern visible
        b = _colour(rng)
    img = np.where(mask[..., None], a, b)
    g = rng.uniform(-1, 1, 2)  # smooth illumination, label-independent
    img = img * (1 + 0.25 * (g[0] * xx + g[1] * yy))[..., None]
    _clutter(rng, img, yy, xx, int(rng.integers(0, clutter + 1)))
    img = img + rng.normal(0, noise, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def ensure_textures_dataset(
    root: str | Path, *, train_per_class: int = 500, val_per_class: int = 100, size: int = 64, seed: int = 0
) -> Path:
    """Build (or reuse) the texture set under `root`; returns `root`. root/{train,val}/<class>/*.png."""
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("need train_per_class >= 1 and val_per_class >= 1")
    root = Path(root)
    config = dict(
        version=FORMAT_VERSION, classes=list(CLASSES), train_per_class=train_per_class,
        val_per_class=val_per_class, size=size, seed=seed,
    )  # fmt: skip
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text() or "null") == config:
        return root
    if ((root / "train").exists() or (root / "val").exists()) and not (root / OWNER).exists():
        raise ValueError(
            f"{root} holds train/ or val/ folders this generator did not make; choose another root"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / OWNER).write_text("made by rectok.study.textures.ensure_textures_dataset; safe to delete\n")
    marker.unlink(missing_ok=True)
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        shutil.rmtree(root / split, ignore_errors=True)
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                rng = np.random.default_rng([seed, split_id, label, k])
                image = Image.fromarray(render(label, rng, size))
                image.save(folder / f"{name}_{k:04d}.png", compress_level=1)
    marker.write_text(json.dumps(config))
    return root
