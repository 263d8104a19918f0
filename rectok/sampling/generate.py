"""Class-conditional generation: DiT^DH velocity field -> Euler -> tokenizer pixel decoder (SPEC section 7).

The pieces sample.py puts together, kept here so they can be tested (the models themselves come
from rectok.checkpoints.loading):
- latent statistics (per-channel mean / std of the tokenizer's posterior mean): from an
  explicit file, else the DiT^DH checkpoint, else the tokenizer checkpoint;
- the sample plan: sample i has label classes[i % len(classes)] (the release's order) and its
  starting noise comes from a generator seeded with (seed, i), so an image depends on its index
  only, never on the batch size or the number of ranks; ranks take contiguous blocks;
- `Sampler`: noise -> rectok.sampling.euler.euler_sample -> de-normalise -> [B, L, C] tokens ->
  pixel decoder -> clamp(out / 2 + 1/2, 0, 1) -> uint8, with optional torch.compile and
  CUDA-graph replay of the velocity network;
- ADM npz output (`arr_0` uint8 [N, H, W, 3], `arr_1` int64 labels) streamed from per-rank
  shard files, so 50k images never have to sit in one process's memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rectok.models import flow
from rectok.models.dit import DiTDH, LatentNormalizer
from rectok.models.tokenizer import RecTok
from rectok.sampling.euler import GUIDANCE, euler_sample
from rectok.sampling.images import to_uint8

log = logging.getLogger(__name__)


def check_compatible(dit: DiTDH, tokenizer: RecTok, weak: DiTDH | None = None) -> None:
    """The generator must produce the tokenizer's latent shape (and the weak model the same)."""
    tc, dc = tokenizer.cfg, dit.config
    if (dc.in_channels, dc.grid_size) != (tc.token_channels, tc.grid_size):
        raise ValueError(
            f"the DiT^DH makes latents [C={dc.in_channels}, {dc.grid_size}x{dc.grid_size}] but the tokenizer "
            f"decodes [C={tc.token_channels}, {tc.grid_size}x{tc.grid_size}]: pair models trained together"
        )
    if weak is not None:
        wc = weak.config
        if (wc.in_channels, wc.grid_size, wc.num_classes) != (dc.in_channels, dc.grid_size, dc.num_classes):
            raise ValueError(
                f"the weak model (C={wc.in_channels}, grid {wc.grid_size}, {wc.num_classes} classes) does "
                f"not match the DiT^DH (C={dc.in_channels}, grid {dc.grid_size}, {dc.num_classes} classes)"
            )


# ----------------------------------------------------------------------------- the sample plan
def class_labels(num_samples: int, classes: Sequence[int]) -> torch.Tensor:
    """Label of every sample index [N] int64: classes[i % len(classes)] (the release's order, so
    the first len(classes) samples cover every class once)."""
    if num_samples < 1 or not classes:
        raise ValueError(f"need at least one sample and one class, got {num_samples} and {list(classes)}")
    return torch.as_tensor(classes, dtype=torch.int64)[torch.arange(num_samples) % len(classes)]


def rank_slice(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous block of sample indices of `rank`; the first N % W ranks take one more."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def index_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Starting noise [len(indices), *shape] float32 on CPU: sample i draws from numpy's PCG64
    seeded with SeedSequence([seed, i]), so it is the same whatever batch, device or rank it lands
    on. (torch's CPU generator keeps only 32 bits of its seed, too few to key 50k samples safely.)"""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for j, i in enumerate(indices):
        if i < 0:
            raise ValueError(f"sample index {i} is negative")
        out[j] = np.random.default_rng([seed, int(i)]).standard_normal(tuple(shape), dtype=np.float32)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- the sampler
class CUDAGraphed(nn.Module):
    """Replays a CUDA graph of fn(x, t, y), captured once per input shape.

    The returned tensor is the graph's static output: it is overwritten by the next replay,
    which is safe for the Euler loop (each velocity is consumed before the next call).
    """

    def __init__(self, fn: Callable, num_classes: int) -> None:
        super().__init__()
        self.fn, self.num_classes = fn, num_classes
        self.graphs: dict[tuple, tuple] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, tuple(t.shape), tuple(y.shape))
        if key not in self.graphs:
            static = (x.clone(), t.clone(), y.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (cuBLAS handles, autotuning, compile)
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*static)
            self.graphs[key] = (graph, static, out)
        graph, (sx, st, sy), out = self.graphs[key]
        sx.copy_(x)
        st.copy_(t)
        sy.copy_(y)
        graph.replay()
        return out


class _Plain(nn.Module):
    """Wraps a (compiled) forward so euler_sample sees an eval-mode module with num_classes."""

    def __init__(self, fn: Callable, num_classes: int) -> None:
        super().__init__()
        self.fn, self.num_classes = fn, num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t, y)


@dataclass(frozen=True)
class SamplerConfig:
    num_points: int = 150  # Euler grid points (num_points - 1 steps)
    guidance: str = "none"  # none | cfg | autoguidance
    scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    shift: float | None = None  # None: sqrt(h * w * C / 4096) from the latent shape
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    rounding: str = "floor"  # float -> uint8 as the release writes its PNGs; "round" as ADM / DiT
    compile: bool = False
    cuda_graph: str = "auto"  # auto (on for CUDA) | on | off

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE)}, got {self.guidance!r}")
        if self.num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {self.num_points}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be auto, on or off, got {self.cuda_graph!r}")


class Sampler:
    """Images from (sample indices, labels): uint8 [B, H, W, 3] numpy, deterministic per index."""

    def __init__(
        self,
        dit: DiTDH,
        tokenizer: RecTok,
        stats: tuple[torch.Tensor, torch.Tensor],
        cfg: SamplerConfig,
        *,
        weak: DiTDH | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        check_compatible(dit, tokenizer, weak)
        if (cfg.guidance == "autoguidance") != (weak is not None):
            raise ValueError("AutoGuidance needs a weak model, and a weak model is only used by AutoGuidance")
        self.device, self.cfg, self.seed = torch.device(device), cfg, seed
        on_cuda = self.device.type == "cuda"
        dc = dit.config
        self.latent_shape = (dc.in_channels, dc.grid_size, dc.grid_size)
        self.shift = cfg.shift or flow.timestep_shift(dc.grid_size, dc.grid_size, dc.in_channels)
        self.num_classes = dc.num_classes
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_cuda)
        self.dtype = torch.bfloat16 if bf16 else None
        if self.dtype is not None and not on_cuda:
            raise ValueError("bf16 sampling is meant for CUDA; use precision fp32 on CPU")
        self.normalizer = LatentNormalizer(*stats).to(self.device)
        if self.normalizer.mean.numel() != dc.in_channels:
            raise ValueError(
                f"latent statistics have {self.normalizer.mean.numel()} channels, the models {dc.in_channels}"
            )
        self.tokenizer = tokenizer.to(self.device).eval()
        self.dit = dit.to(self.device).eval()
        self.weak = weak.to(self.device).eval() if weak is not None else None
        self.use_graphs = cfg.cuda_graph == "on" or (cfg.cuda_graph == "auto" and on_cuda)
        if self.use_graphs and not on_cuda:
            raise ValueError("CUDA-graph replay needs a CUDA device (use cuda_graph='off' on CPU)")
        self.notes: list[str] = []
        self.net = self._wrap(self.dit)
        self.weak_net = self._wrap(self.weak) if self.weak is not None else None
        decoder = self.tokenizer.pixel_decoder
        self.decoder = torch.compile(decoder, dynamic=False) if cfg.compile else decoder

    def _wrap(self, model: DiTDH) -> nn.Module:
        fn = torch.compile(model, dynamic=False) if self.cfg.compile else model
        wrapped = CUDAGraphed(fn, model.num_classes) if self.use_graphs else _Plain(fn, model.num_classes)
        return wrapped.eval()

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        # The autocast weight-cast cache must be off while CUDA graphs are captured.
        return torch.autocast("cuda", dtype=self.dtype, cache_enabled=not self.use_graphs)

    @torch.no_grad()
    def latents(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalised latents at t = 1 [B, C, h, w] from noise [B, C, h, w] (t = 0), float32."""
        cfg = self.cfg
        noise, labels = noise.to(self.device, torch.float32), labels.to(self.device)
        kwargs = dict(num_points=cfg.num_points, shift=self.shift, guidance=cfg.guidance, scale=cfg.scale)
        kwargs.update(weak=self.weak_net, interval=tuple(cfg.interval))
        with self._autocast():
            try:
                return euler_sample(self.net, noise, labels, **kwargs).float()
            except Exception as err:  # graph capture can fail on exotic setups: fall back, say so
                if not self.use_graphs:
                    raise
                note = f"CUDA-graph replay failed ({type(err).__name__}: {str(err)[:120]}); ran without it"
        log.warning(note)
        self.notes.append(note)
        self.use_graphs = False
        self.net = self._wrap(self.dit)
        self.weak_net = self._wrap(self.weak) if self.weak is not None else None
        return self.latents(noise, labels)  # the whole batch again, from its noise: same result

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents [B, C, h, w] -> uint8 images [B, H, W, 3]."""
        z = self.normalizer.denormalize(latents.float())
        tokens = z.flatten(2).transpose(1, 2)  # (B, L, C), row-major as the tokenizer's grid
        with self._autocast():
            images = self.decoder(tokens)
        images = torch.clamp(images.float() * 0.5 + 0.5, 0.0, 1.0)
        return to_uint8(images, self.cfg.rounding).cpu().numpy()

    def __call__(self, indices: Sequence[int], labels: torch.Tensor) -> np.ndarray:
        noise = index_noise(indices, self.latent_shape, self.seed)
        return self.decode(self.latents(noise, labels))


def generate_block(
    sampler: Sampler,
    block: Sequence[int],
    labels: torch.Tensor,
    out: np.ndarray,
    batch_size: int,
    *,
    pad: bool = False,
    on_batch: Callable[[list[int], np.ndarray], None] | None = None,
) -> None:
    """Fill out[k] with the image of sample block[k] (labels indexed by sample), batch by batch.

    pad: run the last batch at full size (repeating its last index) so compiled models and
    CUDA graphs see one shape; the extra images are dropped. on_batch(indices, images) is
    called after every batch (PNG writing, progress).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for offset in range(0, len(block), batch_size):
        idx = [int(i) for i in block[offset : offset + batch_size]]
        n = len(idx)
        run_idx = idx + [idx[-1]] * (batch_size - n) if pad else idx
        images = sampler(run_idx, labels[run_idx])[:n]
        out[offset : offset + n] = images
        if on_batch is not None:
            on_batch(idx, images)


# ----------------------------------------------------------------------------- output files
def shard_path(npz_path: Path, rank: int, world_size: int) -> Path:
    return npz_path.with_name(f".{npz_path.stem}.rank{rank:04d}-of-{world_size:04d}.npy")


def open_shard(npz_path: Path, rank: int, world_size: int, count: int, image_shape: tuple) -> np.ndarray:
    """A writable memory-mapped uint8 [count, H, W, 3] shard for one rank's block of samples."""
    path = shard_path(npz_path, rank, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, *image_shape))


def merge_shards(npz_path: Path, world_size: int, labels: torch.Tensor, keep_shards: bool = False) -> Path:
    """Stream the ranks' shards, in rank order (= sample order), into an ADM npz: arr_0 uint8
    [N, H, W, 3], arr_1 int64 labels [N]. Uncompressed, as ADM writes it. Written atomically."""
    shards = [np.load(shard_path(npz_path, r, world_size), mmap_mode="r") for r in range(world_size)]
    total = sum(len(s) for s in shards)
    if total != len(labels):
        raise RuntimeError(f"the shards hold {total} images, the plan {len(labels)}")
    image_shape = shards[0].shape[1:]
    tmp = npz_path.with_name(f".{npz_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (total, *image_shape)}
            np.lib.format.write_array_header_2_0(f, header)
            for shard in shards:
                for start in range(0, len(shard), 256):
                    f.write(np.ascontiguousarray(shard[start : start + 256]).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, labels.numpy().astype(np.int64))
    os.replace(tmp, npz_path)
    del shards
    if not keep_shards:
        for r in range(world_size):
            shard_path(npz_path, r, world_size).unlink(missing_ok=True)
    return npz_path
