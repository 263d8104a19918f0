"""Data pipeline: what this file proves.

- center_crop_arr equals a direct transcription of ADM's center_crop_arr (bit-exact).
- The PIL loader yields NCHW float32 in [-1, 1] with sorted-wnid labels, from folders and file lists.
- The DALI (CPU) loader agrees with the PIL loader sample by sample (same order, labels, and
  pixels within the resampling tolerance stated in test_dali_cpu_matches_pil).
- Evaluation sharding over 2 ranks covers every sample exactly once (both backends); training
  gives ranks equal disjoint shares and a fresh permutation every epoch, reproducible by epoch.
- Corrupt files (truncated JPEG, text named .JPEG) are skipped and counted by the PIL path,
  and excluded by verify_dataset (function and CLI) so that DALI never sees them.
- The demo dataset builds offline, has the promised layout, is deterministic, and is reused
  when complete but rebuilt when interrupted.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rectok.data.dali import dali_available
from rectok.data.demo import MARKER, ensure_demo_dataset
from rectok.data.loading import build_loader
from rectok.data.pil_loader import PILLoader
from rectok.data.sharding import ShardedSampler
from rectok.data.sources import default_exclusion_path, read_exclusion_list, resolve_samples
from rectok.data.transforms import center_crop_arr, to_tensor
from rectok.data.verify import main as verify_main
from rectok.data.verify import verify_dataset

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")

SIZE = 32
# (width, height) per image: the first ones keep the short side < 2 * SIZE (no box halving),
# the others are halved once or twice, with even and odd sides.
NO_HALVING = [(40, 33), (57, 48), (33, 61), (50, 50), (47, 39)]
HALVING = [(96, 70), (131, 67), (140, 150), (75, 99), (64, 64), (210, 133), (88, 129)]


def adm_center_crop_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's image_datasets.center_crop_arr, transcribed literally."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with some edges: photo-like content, cheap to make."""
    coarse = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    arr = np.array(img)
    arr[height // 3 : height // 3 + 2] = 255 - arr[height // 3 : height // 3 + 2]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/train/<wnid>/*.JPEG with 3 classes and 12 images of assorted sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    wnids = ["n02", "n01", "n03"]  # created unsorted: labels must follow sorted order
    for k, (w, h) in enumerate(NO_HALVING + HALVING):
        cls_dir = root / "train" / wnids[k % 3]
        cls_dir.mkdir(parents=True, exist_ok=True)
        _photo(rng, w, h).save(cls_dir / f"img_{k:02d}.JPEG", quality=92)
    (root / "train" / "n01" / "notes.txt").write_text("not listed: wrong extension")
    return root


@pytest.fixture
def corrupt_folder(folder: Path, tmp_path: Path) -> Path:
    """The folder dataset plus a truncated JPEG and a text file named like a JPEG."""
    root = tmp_path / "corrupt"
    shutil.copytree(folder, root)
    good = (root / "train" / "n01" / "img_01.JPEG").read_bytes()
    (root / "train" / "n02" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (root / "train" / "n03" / "text.JPEG").write_text("this is not an image")
    return root


def _collect(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {k: torch.cat([b[k].cpu() for b in batches]) for k in ("image", "label", "index")}


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [16, 32, 64])
def test_center_crop_matches_adm(size):
    rng = np.random.default_rng(size)
    for w, h in [(40, 33), (131, 67), (210, 133), (64, 64), (17, 29), (301, 300), (1000, 257)]:
        img = _photo(rng, w, h)
        ours = np.asarray(center_crop_arr(img, size))
        ref = adm_center_crop_reference(img, size)
        assert ours.shape == (size, size, 3)
        np.testing.assert_array_equal(ours, ref)


def test_pil_loader_folder_layout(folder):
    loader = build_loader(
        folder, split="train", batch_size=5, image_size=SIZE, train=False, backend="pil", num_workers=0
    )
    assert isinstance(loader, PILLoader) and loader.backend == "pil"
    assert loader.samples.classes == ["n01", "n02", "n03"]
    assert len(loader.samples) == 12  # notes.txt is not an image file
    out = _collect(loader)
    assert out["image"].shape == (12, 3, SIZE, SIZE) and out["image"].dtype == torch.float32
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    assert out["index"].tolist() == list(range(12))  # evaluation: source order, no flips
    for i in (0, 7):
        rel = loader.samples.relpaths[i]
        assert out["label"][i] == ["n01", "n02", "n03"].index(rel.split("/")[0])
        expected = to_tensor(
            Image.fromarray(
                adm_center_crop_reference(Image.open(folder / "train" / rel).convert("RGB"), SIZE)
            )
        )
        torch.testing.assert_close(out["image"][i], expected, rtol=0, atol=0)
    # [-1, 1] mapping: pixel 0 -> -1, 255 -> 1
    mapped = to_tensor(Image.new("RGB", (2, 2), (0, 255, 51)))[:, 0, 0]
    torch.testing.assert_close(mapped, torch.tensor([-1.0, 1.0, -0.6]))


def test_random_resized_crop_and_flip_vary_by_epoch(folder):
    loader = build_loader(
        folder,
        split="train",
        batch_size=4,
        image_size=SIZE,
        crop="random_resized",
        backend="pil",
        num_workers=0,
    )
    first, second = next(iter(loader)), next(iter(loader))
    assert first["image"].shape == (4, 3, SIZE, SIZE)
    assert not torch.equal(first["index"], second["index"])  # fresh permutation
    loader.set_epoch(0)
    again = next(iter(loader))  # same epoch -> same samples and same augmentation
    assert torch.equal(first["index"], again["index"]) and torch.equal(first["image"], again["image"])


def test_auto_backend_is_pil_without_cuda(folder, caplog):
    with caplog.at_level(logging.INFO, logger="rectok.data"):
        loader = build_loader(
            folder, split="train", batch_size=2, image_size=SIZE, backend="auto", device="cpu"
        )
    assert loader.backend == "pil"
    assert "PIL" in caplog.text and "no CUDA device" in caplog.text
    with pytest.raises(ValueError, match="backend"):
        build_loader(folder, split="train", batch_size=2, backend="tf")


# ----------------------------------------------------------------------------- DALI vs PIL


def _halvings(size: tuple[int, int], image_size: int) -> list[tuple[int, int]]:
    """The (w, h) sizes ADM's center crop halves, in order."""
    steps = []
    while min(size) >= 2 * image_size:
        steps.append(size)
        size = (size[0] // 2, size[1] // 2)
    return steps


@needs_dali
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_dali_matches_pil(folder, device):
    """Tolerance, in 0..255 grey levels. JPEG decoding is identical (libjpeg-turbo in both) and
    the output geometry (resize size, crop offsets) is replayed exactly, so only resampling
    filters differ:
    - no box halving: DALI's antialiased cubic vs PIL's BICUBIC, max <= 3, mean <= 0.5;
    - halving of even sides: emulated by an exact 2x2 average, mean <= 1;
    - halving of an odd side: PIL's box then averages pixel pairs that shift by one across
      the image, which a bilinear resize only approximates; on these sharp synthetic images
      the mean error reaches ~6.5 (on photos at 256 px it is ~1), so the bound is 8.
    On CUDA ("mixed" nvJPEG decoding, whose IDCT / chroma upsampling may differ from
    libjpeg-turbo) every bound gets 1.5 more on the mean and the max bound is dropped.
    """
    kwargs = dict(split="train", batch_size=5, image_size=SIZE, train=False, num_workers=0, exclude=None)
    pil = _collect(build_loader(folder, backend="pil", **kwargs))
    dali = _collect(build_loader(folder, backend="dali", device=device, **kwargs))
    slack, max_bound = (0.0, 3.0) if device == "cpu" else (1.5, 255.0)
    assert torch.equal(pil["index"], dali["index"]) and torch.equal(pil["label"], dali["label"])
    samples = resolve_samples(folder, "train")
    kinds = set()
    for k in range(len(samples)):
        steps = _halvings(Image.open(samples.path(k)).size, SIZE)
        err = (pil["image"][k] - dali["image"][k]).abs() * 127.5
        if not steps:
            kinds.add("none")
            assert err.max() <= max_bound and err.mean() <= 0.5 + slack, (steps, err.max(), err.mean())
        elif all(w % 2 == 0 and h % 2 == 0 for w, h in steps):
            kinds.add("even")
            assert err.mean() <= 1.0 + slack, (steps, err.mean())
        else:
            kinds.add("odd")
            assert err.mean() <= 8.0 + slack, (steps, err.mean())
    assert kinds == {"none", "even", "odd"}


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_eval_coverage_two_shards(folder, backend):
    seen = []
    for rank in range(2):
        loader = build_loader(
            folder,
            split="train",
            batch_size=4,
            image_size=SIZE,
            train=False,
            rank=rank,
            world_size=2,
            backend=backend,
            num_workers=0,
            exclude=None,
        )
        out = _collect(loader)
        assert len(out["index"]) == len(loader.sampler) == 6
        assert len(loader) == 2  # ceil(6 / 4): the last batch is partial, not padded
        seen.append(out["index"].tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_eval_coverage_unequal_shards():
    # 13 samples over 2 ranks: 7 + 6, each exactly once, no padding duplicates.
    parts = [ShardedSampler(13, r, 2, train=False).indices(0) for r in range(2)]
    assert [len(p) for p in parts] == [7, 6]
    assert sorted(parts[0] + parts[1]) == list(range(13))
    assert ShardedSampler(13, 1, 2, train=False).indices(5) == parts[1]  # evaluation ignores the epoch


def test_train_shards_fresh_permutation_each_epoch():
    n, world = 23, 3
    epochs = []
    for epoch in range(3):
        shards = [ShardedSampler(n, r, world, train=True, seed=7).indices(epoch) for r in range(world)]
        assert all(len(s) == n // world for s in shards)  # equal shares: no DDP hang
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat) == (n // world) * world  # disjoint, tail dropped
        epochs.append(shards[0])
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert ShardedSampler(n, 0, world, train=True, seed=7).indices(1) == epochs[1]  # reproducible (resume)
    assert ShardedSampler(n, 0, world, train=True, seed=8).indices(1) != epochs[1]
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(n, 3, world)


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_train_loader_shuffles_each_epoch(folder, backend):
    loader = build_loader(
        folder,
        split="train",
        batch_size=2,
        image_size=SIZE,
        train=True,
        rank=1,
        world_size=2,
        seed=3,
        backend=backend,
        num_workers=0,
        exclude=None,
    )
    epoch0, epoch1 = _collect(loader)["index"].tolist(), _collect(loader)["index"].tolist()
    assert len(epoch0) == len(epoch1) == len(loader) * 2 == 6
    assert epoch0 != epoch1
    assert epoch0 == ShardedSampler(12, 1, 2, train=True, seed=3).indices(0)  # same order on both backends


# ----------------------------------------------------------------------------- corrupt files


def test_corrupt_files_skipped_and_counted_pil(corrupt_folder, caplog):
    samples = resolve_samples(corrupt_folder, "train")
    bad = {samples.relpaths.index("n02/truncated.JPEG"), samples.relpaths.index("n03/text.JPEG")}
    with caplog.at_level(logging.WARNING, logger="rectok.data"):
        train = build_loader(
            corrupt_folder, split="train", batch_size=7, image_size=SIZE, backend="pil", num_workers=0
        )
        batches = list(train)
    assert [b["image"].shape[0] for b in batches] == [7, 7]  # substituted: batches stay full
    assert train.num_skipped == 2
    assert not bad & set(torch.cat([b["index"] for b in batches]).tolist())
    assert "truncated.JPEG" in caplog.text and "text.JPEG" in caplog.text

    evaluation = build_loader(
        corrupt_folder,
        split="train",
        batch_size=4,
        image_size=SIZE,
        train=False,
        backend="pil",
        num_workers=1,
    )  # a worker process: the count must still reach the main process
    out = _collect(evaluation)
    assert evaluation.num_skipped == 2
    assert sorted(out["index"].tolist()) == sorted(set(range(len(samples))) - bad)  # dropped, not duplicated


def test_verify_dataset_writes_exclusion_list(corrupt_folder):
    bad = verify_dataset(corrupt_folder, split="train", num_workers=1)
    assert sorted(bad) == ["n02/truncated.JPEG", "n03/text.JPEG"]
    exclusion = default_exclusion_path(corrupt_folder, "train")
    assert exclusion == corrupt_folder / "train.exclude.txt"
    assert read_exclusion_list(exclusion) == set(bad)
    # The PIL loader honours the list too: nothing left to skip.
    loader = build_loader(
        corrupt_folder,
        split="train",
        batch_size=4,
        image_size=SIZE,
        train=False,
        backend="pil",
        num_workers=0,
    )
    assert len(_collect(loader)["index"]) == 12 and loader.num_skipped == 0
    exclusion.unlink()
    assert verify_main(["verify", str(corrupt_folder), "--split", "train", "--workers", "1"]) == 0
    assert read_exclusion_list(exclusion) == set(bad)


@needs_dali
def test_dali_uses_exclusion_list(corrupt_folder):
    verify_dataset(corrupt_folder, split="train", num_workers=1)
    for rank in range(2):
        loader = build_loader(
            corrupt_folder,
            split="train",
            batch_size=4,
            image_size=SIZE,
            train=False,
            rank=rank,
            world_size=2,
            backend="dali",
            num_workers=1,
        )
        out = _collect(loader)
        assert len(out["index"]) == 6
        assert all(
            "truncated" not in p and "text" not in p
            for p in (loader.samples.relpaths[i] for i in out["index"])
        )


# ----------------------------------------------------------------------------- file lists


def test_file_list_input(folder, tmp_path):
    samples = resolve_samples(folder, "train")
    lines = ["# relpath label", ""] + [f"train/{samples.relpaths[i]} {i % 2}" for i in (3, 0, 5)]
    file_list = tmp_path / "list.txt"
    file_list.write_text("\n".join(lines) + "\n")
    loader = build_loader(
        file_list, root=folder, batch_size=8, image_size=SIZE, train=False, backend="pil", num_workers=0
    )
    out = _collect(loader)
    assert out["label"].tolist() == [1, 0, 1]
    torch.testing.assert_close(
        out["image"][1], to_tensor(center_crop_arr(Image.open(samples.path(0)).convert("RGB"), SIZE))
    )
    bad_list = tmp_path / "abs.txt"
    bad_list.write_text(f"{samples.path(0)} 1\n")
    with pytest.raises(ValueError, match="relative"):
        resolve_samples(bad_list)
    with pytest.raises(FileNotFoundError):
        resolve_samples(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- demo dataset


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_demo_dataset_offline_deterministic_idempotent(tmp_path, no_network, monkeypatch):
    small = dict(train_per_class=3, val_per_class=1, seed=5)
    a = ensure_demo_dataset(tmp_path / "a", **small)
    b = ensure_demo_dataset(tmp_path / "b", **small)
    tree = _tree(a)
    assert tree == _tree(b)  # deterministic
    classes = sorted(p.name for p in (a / "train").iterdir())
    assert len(classes) == 8 and classes == sorted(p.name for p in (a / "val").iterdir())
    assert len(tree) == 8 * (3 + 1)
    for rel in list(tree)[:6]:
        w, h = Image.open(a / rel).size
        assert 64 <= w <= 128 and 64 <= h <= 128
    assert len(resolve_samples(a, "train")) == 24 and len(resolve_samples(a, "val")) == 8

    # Complete: reused without regenerating anything.
    monkeypatch.setattr(
        "rectok.data.demo._augment", lambda *a, **k: pytest.fail("rebuilt a complete dataset")
    )
    assert ensure_demo_dataset(a, **small) == a
    monkeypatch.undo()
    # Interrupted (marker missing, a file lost): rebuilt to the same bytes.
    (a / MARKER).unlink()
    next((a / "train").rglob("*.JPEG")).unlink()
    ensure_demo_dataset(a, **small)
    assert _tree(a) == tree and (a / MARKER).is_file()
    # A different seed rebuilds with different images.
    ensure_demo_dataset(a, train_per_class=3, val_per_class=1, seed=6)
    assert _tree(a) != tree
    # Someone else's folder is never deleted.
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="did not make"):
        ensure_demo_dataset(foreign)


def test_demo_dataset_default_size(tmp_path, no_network):
    root = ensure_demo_dataset(tmp_path / "demo")
    assert len(resolve_samples(root, "train")) == 8 * 40 and len(resolve_samples(root, "val")) == 8 * 10
    loader = build_loader(
        root, split="val", batch_size=16, image_size=64, train=False, backend="pil", num_workers=0
    )
    out = _collect(loader)
    assert out["image"].shape == (80, 3, 64, 64) and out["label"].bincount().tolist() == [10] * 8
