"""Where the images come from: an ImageNet-style folder (`root/<split>/<wnid>/*`, class index =
sorted wnid order) or a file list (`relpath label` per line), and the exclusion lists that
`python -m rectok.data verify` writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class SampleSet:
    """Where the images are: `root / relpaths[i]` has class `labels[i]` (-1 when unlabelled)."""

    root: Path
    relpaths: list[str]
    labels: list[int]
    classes: list[str] | None = None  # wnids of a folder dataset, None for file lists

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpaths[i])

    def spread(self, count: int) -> SampleSet:
        """`count` samples evenly spread over the set (every class of a class-sorted folder), in
        order; the whole set when count is 0 or at least its size."""
        if count <= 0 or count >= len(self):
            return self
        picks = np.linspace(0, len(self) - 1, count).round().astype(int)
        return SampleSet(
            self.root, [self.relpaths[i] for i in picks], [self.labels[i] for i in picks], self.classes
        )

    def without(self, excluded: set[str]) -> SampleSet:
        """A copy without the relative paths in `excluded` (e.g. from verify_dataset)."""
        keep = [i for i, p in enumerate(self.relpaths) if p not in excluded]
        return SampleSet(
            self.root, [self.relpaths[i] for i in keep], [self.labels[i] for i in keep], self.classes
        )


def scan_image_folder(folder: str | Path) -> SampleSet:
    """Index `folder/<class>/<file>` (ImageNet layout); class index = sorted class-folder order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image files>")
    relpaths, labels = [], []
    for label, wnid in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(folder / wnid):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMG_EXTENSIONS):
                    relpaths.append(os.path.relpath(os.path.join(dirpath, name), folder))
                    labels.append(label)
    if not relpaths:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    return SampleSet(folder, relpaths, labels, classes)


def read_file_list(file_list: str | Path, root: str | Path | None = None) -> SampleSet:
    """Parse a file list: `relpath label` per line (label optional -> -1); blank and # lines skipped.

    Paths are relative to `root` (default: the file list's own folder).
    """
    file_list = Path(file_list)
    if not file_list.is_file():
        raise FileNotFoundError(f"file list not found: {file_list}")
    root = Path(root) if root is not None else file_list.parent
    relpaths, labels = [], []
    for lineno, line in enumerate(file_list.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            relpaths.append(parts[0])
            labels.append(int(parts[1]))
        else:  # no label column (paths may contain spaces)
            relpaths.append(line)
            labels.append(-1)
        if os.path.isabs(relpaths[-1]):
            raise ValueError(
                f"{file_list}:{lineno}: paths must be relative to the root ({root}), got {line!r}"
            )
    if not relpaths:
        raise ValueError(f"file list {file_list} is empty")
    return SampleSet(root, relpaths, labels, None)


def resolve_samples(
    source: str | Path, split: str | None = None, root: str | Path | None = None
) -> SampleSet:
    """A SampleSet from a folder (`source/split/<class>/...`, or `source/<class>/...` when split is
    None) or a file list (`source` is a file; paths relative to `root`, default its folder)."""
    source = Path(source)
    if source.is_file():
        return read_file_list(source, root)
    if not source.exists():
        raise FileNotFoundError(f"dataset not found: {source} (expected a folder or a file list)")
    if split is not None:
        if not (source / split).is_dir():
            raise FileNotFoundError(
                f"split folder not found: {source / split} (ImageNet layout: ROOT/{split}/<wnid>/)"
            )
        source = source / split
    return scan_image_folder(source)


def default_exclusion_path(source: str | Path, split: str | None = None) -> Path:
    """Where verify_dataset writes its exclusion list by default: beside the split folder
    (`ROOT/<split>.exclude.txt`) or beside the file list (`LIST.exclude.txt`)."""
    source = Path(source)
    if source.is_file():
        return source.with_name(source.name + ".exclude.txt")
    if split is not None:
        return source / f"{split}.exclude.txt"
    return source.with_name(source.name + ".exclude.txt")


def read_exclusion_list(path: str | Path) -> set[str]:
    """Relative paths listed one per line (# comments allowed)."""
    lines = Path(path).read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}
