"""Reading evaluation images: ADM sample npz files, image folders, and labelled center-cropped datasets.

Every source yields uint8 batches [B, H, W, 3] in a fixed order, so results do not depend
on the batch size. ADM npz files (`arr_0`, [N, H, W, 3] uint8) are streamed from the zip
member, as ADM's evaluator does, so 50k 256px samples (~10 GB) never sit in memory at once.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rectok.data.transforms import center_crop_arr

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(root: str | Path) -> list[Path]:
    """PNG/JPEG files under `root` (recursive), sorted by path so the order is reproducible."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no PNG/JPEG images under {root}")
    return files


def _read_rgb(path: Path, center_crop: int | None) -> np.ndarray:
    with Image.open(path) as im:
        if center_crop is not None:
            return np.asarray(center_crop_arr(im.convert("RGB"), center_crop))
        return np.asarray(im.convert("RGB"))


class _FolderImages(Dataset):
    def __init__(self, files: list[Path], center_crop: int | None) -> None:
        self.files, self.center_crop = files, center_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return _read_rgb(self.files[i], self.center_crop)


def _stack_same_size(items: list[np.ndarray]) -> np.ndarray:
    shapes = {a.shape for a in items}
    if len(shapes) != 1:
        raise ValueError(
            f"images of different sizes {sorted(shapes)} in one set; FID inputs must share one size "
            "(build center-cropped statistics with `python -m rectok.eval stats --center-crop SIZE`)"
        )
    return np.stack(items)


class ImageSource:
    """A fixed, ordered set of RGB images: an ADM npz (`arr_0`), a folder of PNG/JPEG, or an array.

    `len(source)` is the number of images it yields (after `limit`); `batches(b)` yields
    uint8 [b, H, W, 3] arrays (the last one may be smaller).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        array: np.ndarray | None = None,
        limit: int | None = None,
        center_crop: int | None = None,
        num_workers: int = 0,
    ) -> None:
        if (path is None) == (array is None):
            raise ValueError("give exactly one of path or array")
        self.num_workers, self.center_crop = num_workers, center_crop
        self.path = Path(path) if path is not None else None
        self._array, self._files, self._npz_header = None, None, None
        if array is not None:
            _check_images(array, "array")
            total = len(array)
            self._array = array
        elif self.path.is_dir():
            self._files = list_images(self.path)
            total = len(self._files)
        elif self.path.suffix == ".npz":
            if not self.path.is_file():
                raise FileNotFoundError(f"npz file not found: {self.path}")
            self._npz_header = read_npz_image_header(self.path)
            total = self._npz_header[0][0]
        else:
            raise FileNotFoundError(f"{self.path} is neither an image folder nor an .npz file")
        if center_crop is not None and self._files is None:
            raise ValueError("center_crop applies to image folders only")
        if limit is not None and not 0 < limit <= total:
            raise ValueError(f"limit {limit} must be in 1..{total} (images in {path or 'array'})")
        self.num_images = total if limit is None else limit

    def __len__(self) -> int:
        return self.num_images

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "in-memory array"

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = self.num_images
        if self._array is not None:
            for i in range(0, n, batch_size):
                yield np.ascontiguousarray(self._array[i : min(i + batch_size, n)])
        elif self._files is not None:
            ds = _FolderImages(self._files[:n], self.center_crop)
            loader = DataLoader(
                ds, batch_size=batch_size, num_workers=self.num_workers, collate_fn=_stack_same_size
            )
            yield from loader
        else:
            yield from _npz_batches(self.path, self._npz_header, n, batch_size)


def _check_images(arr: np.ndarray, where: str) -> None:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")


def read_npz_image_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of `arr_0` in an npz without reading the data."""
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            keys = [n.removesuffix(".npy") for n in zf.namelist()]
            raise ValueError(
                f"{path} has no 'arr_0' image array (keys: {keys}); ADM sample files store images there"
            )
        with zf.open("arr_0.npy") as f:
            shape, dtype, _ = _read_npy_header(f, path)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {dtype} {shape}")
    return shape, dtype


def _read_npy_header(f, path: Path):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{path}: unsupported .npy format version {version}")
    if fortran:
        raise ValueError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous")
    return shape, dtype, fortran


def _npz_batches(path: Path, header, n: int, batch_size: int) -> Iterator[np.ndarray]:
    (_, h, w, c), _ = header
    per_image = h * w * c
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        _read_npy_header(f, path)  # skip to the data
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            buf = f.read(count * per_image)
            if len(buf) != count * per_image:
                raise ValueError(f"{path}: arr_0 ended early at image {start + len(buf) // per_image}")
            # copy: frombuffer views are read-only, and torch warns on (and may not write to) those
            yield np.frombuffer(buf, dtype=np.uint8).reshape(count, h, w, c).copy()


class LabelledImageFolder(Dataset):
    """Images under root/<class>/..., center-cropped to `image_size`, as ([-1, 1] float [3, H, W], label).

    Classes are the sorted sub-folder names (the torchvision ImageFolder / ImageNet layout);
    images directly under root get label -1. `per_class` keeps the first k images of every
    class (class-balanced subsets for probing); `limit` keeps the first n overall.
    """

    def __init__(
        self, root: str | Path, image_size: int, per_class: int | None = None, limit: int | None = None
    ):
        root = Path(root)
        files = list_images(root)
        self.classes = sorted(
            {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
        )
        index = {c: i for i, c in enumerate(self.classes)}
        labels = [
            index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1 for p in files
        ]
        if per_class is not None:
            kept: dict[int, int] = {}
            keep = []
            for i, y in enumerate(labels):
                kept[y] = kept.get(y, 0) + 1
                if kept[y] <= per_class:
                    keep.append(i)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if limit is not None:
            files, labels = files[:limit], labels[:limit]
        self.files, self.labels, self.image_size = files, labels, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = _read_rgb(self.files[i], self.image_size)
        x = (
            torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        )  # copy: PIL views are read-only
        return x, self.labels[i]


def first_images(loader: Iterable, max_images: int | None, desc: str, progress: bool = True) -> Iterator:
    """(index of the batch's first image, images, labels) for the (images, labels) batches of `loader`
    until `max_images` images (None: all), the last batch cut to fit, with a progress bar. A loader
    that yields no image is an error."""
    count = 0
    with tqdm(total=max_images, desc=desc, unit="img", disable=not progress) as bar:
        for images, labels in loader:
            if max_images is not None:
                if count >= max_images:
                    break
                images, labels = images[: max_images - count], labels[: max_images - count]
            yield count, images, labels
            count += len(images)
            bar.update(len(images))
    if count == 0:
        raise ValueError("the loader yielded no images")
