"""NVIDIA DALI image loader: the fast path of rectok.data (same batches, same sample order).

Decoding runs on the GPU ("mixed" nvJPEG) when a CUDA device is given and on the CPU
otherwise (CPU-only pipelines need device_id=None). Each epoch builds a small pipeline whose
file reader gets this rank's samples in the order chosen by rectok.data.ShardedSampler, so
the PIL and DALI backends shard, shuffle (seed + epoch) and cover evaluation data identically,
and resuming at any epoch reproduces its order. The reader's labels are the sample indices;
class labels are looked up from them, which also gives every batch its "index" entry.

ADM center crop in DALI: the geometry is exact, the filters are approximate.
- Output size: the short-side halvings and the rounding of the long side are replayed with
  integer arithmetic on the encoded image shape, so the resized image has exactly the size
  PIL's center_crop_arr gives it, and the crop offsets are floored as in ADM
  (rounding="truncate"). The whole source maps onto the output (subpixel_scale=False), as in PIL.
- Filters: each BOX halving becomes a non-antialiased bilinear resize to half size, which is
  an exact 2x2 average when the side is even and close to PIL's box when it is odd; the final
  resize is antialiased Catmull-Rom cubic, as PIL's BICUBIC. JPEG decoding matches PIL
  (libjpeg-turbo in both). On ImageNet-like photos at 256 px the result differs from PIL by
  ~0.1-1 gray level on average; a few pixels on sharp edges of odd-sized images differ more
  (see tests/test_data.py for the measured tolerance).
A corrupt file stops a DALI pipeline, so build the exclusion list first
(`python -m rectok.data verify ROOT`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rectok.data.sharding import ShardedLoader
from rectok.data.sources import SampleSet
from rectok.data.transforms import CROPS

# Halving stages replayed in the pipeline: enough for short sides up to 2**6 * image_size
# (16k px at 256); anything larger is left to the (antialiased) final resize.
MAX_HALVINGS = 5


def dali_available() -> bool:
    """True when nvidia.dali and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _adm_resize_crop(jpegs, images, image_size: int):
    """ADM center_crop_arr on decoded `images` (HWC uint8), sizes computed from `jpegs`."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    shape = fn.peek_image_shape(jpegs)  # (H, W, C) int64, read from the header
    h, w = shape[0], shape[1]
    for _ in range(MAX_HALVINGS):
        # A stage with halve == 0 resizes to the same size, which is the identity.
        halve = dmath.min(h, w) >= 2 * image_size
        h = h - halve * (h - h // 2)
        w = w - halve * (w - w // 2)
        images = fn.resize(
            images,
            resize_x=fn.cast(w, dtype=types.FLOAT),
            resize_y=fn.cast(h, dtype=types.FLOAT),
            interp_type=types.INTERP_LINEAR,
            antialias=False,
            subpixel_scale=False,
        )
    short = dmath.min(h, w)

    def round_half_even(n):
        # Python's round(n / d) for d = 2 * short: floor((n + short) / d), minus one on odd ties.
        num = 2 * n * image_size + short
        q = num // (2 * short)
        tie = q * (2 * short) == num
        return q - tie * (q - (q // 2) * 2)

    out_w, out_h = round_half_even(w), round_half_even(h)
    images = fn.resize(
        images,
        resize_x=fn.cast(out_w, dtype=types.FLOAT),
        resize_y=fn.cast(out_h, dtype=types.FLOAT),
        interp_type=types.INTERP_CUBIC,
        antialias=True,
        subpixel_scale=False,
    )
    return images, dict(crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5, rounding="truncate")


def build_pipeline(
    files: list[str],
    indices: list[int],
    *,
    batch_size: int,
    image_size: int,
    crop: str,
    hflip: bool,
    seed: int,
    num_threads: int,
    device_id: int | None,
):
    """A DALI pipeline reading `files` once in the given order; outputs image [B,3,S,S] float in
    [-1, 1] (NCHW) and index [B,1] int (the reader's labels)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    decode_device = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipe():
        jpegs, index = fn.readers.file(
            files=files,
            labels=indices,
            random_shuffle=False,  # the order is already the sampler's
            pad_last_batch=False,
            name="Reader",
        )
        if crop == "center":
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images, crop_args = _adm_resize_crop(jpegs, images, image_size)
        else:
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decode_device,
                output_type=types.RGB,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
            )
            images = fn.resize(
                images,
                resize_x=float(image_size),
                resize_y=float(image_size),
                interp_type=types.INTERP_CUBIC,
                antialias=True,
            )
            crop_args = {}
        mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[127.5] * 3,  # (x - 127.5) / 127.5 maps [0, 255] onto [-1, 1]
            std=[127.5] * 3,
            mirror=mirror,
            **crop_args,
        )
        return images, index

    return pipe()


class DALILoader(ShardedLoader):
    """Batches of {"image", "label", "index"} from DALI; same interface as rectok.data.PILLoader.

    Images live on the loader's CUDA device with mixed decoding (CPU otherwise). Unreadable
    files must be excluded beforehand (verify_dataset), so num_skipped is always 0.
    """

    backend = "dali"

    def __init__(
        self,
        samples: SampleSet,
        *,
        batch_size: int,
        image_size: int = 256,
        train: bool = True,
        crop: str = "center",
        hflip: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int = 4,
        device: str | torch.device = "cpu",
    ) -> None:
        if not dali_available():
            raise ImportError(
                "backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or use backend='pil')"
            )
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        super().__init__(samples, batch_size, train, rank, world_size, seed)
        device = torch.device(device)
        if device.type == "cuda":
            self.device_id: int | None = (
                device.index if device.index is not None else torch.cuda.current_device()
            )
        else:
            self.device_id = None  # CPU-only pipeline
        self.image_size = image_size
        self.crop, self.hflip = crop, train if hflip is None else hflip
        self.rank, self.seed, self.num_threads = rank, seed, num_threads
        self.labels = torch.tensor(samples.labels, dtype=torch.int64)
        self.num_skipped = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch = self.epoch
        order = self._start_epoch()
        if not order:
            return  # an evaluation rank with no samples (more ranks than samples)
        pipe = build_pipeline(
            [self.samples.path(i) for i in order],
            order,
            batch_size=self.batch_size,
            image_size=self.image_size,
            crop=self.crop,
            hflip=self.hflip,
            # Flip / crop randomness differs per rank and epoch; DALI seeds must fit in int32.
            seed=(self.seed * 1_000_003 + epoch * 7_919 + self.rank) % (2**31 - 1),
            num_threads=self.num_threads,
            device_id=self.device_id,
        )
        # reader_name lets the iterator stop at the end of the list; PARTIAL trims the last batch
        # (no wrapped-around duplicates), DROP discards it for training.
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(
            pipe, ["image", "index"], reader_name="Reader", last_batch_policy=policy
        )
        try:
            for (out,) in iterator:
                index = out["index"].reshape(-1).to(torch.int64).cpu()
                yield {"image": out["image"], "label": self.labels[index], "index": index}
        finally:
            del iterator, pipe
