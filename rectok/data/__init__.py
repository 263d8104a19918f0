"""Image datasets and loaders for tokenizer training and evaluation (SPEC section 5).

Sources: an ImageNet folder (`root/<split>/<wnid>/*.JPEG`, class index = sorted wnid order)
or a file list (one `relpath label` per line, relative to a root). Images go through ADM's
`center_crop_arr` (or RandomResizedCrop), an optional random horizontal flip, and come out as
float32 NCHW in [-1, 1]. Batches are dicts: image [B, 3, S, S], label [B] int64, index [B] int64
(the sample's position in the source, for exact evaluation bookkeeping).

Two backends share one sampler, so they visit the same samples in the same order:
- "pil": PIL decoding in torch DataLoader workers (pil_loader). Corrupt or truncated files
  never stop a run: training substitutes the next readable sample, evaluation drops the
  sample; either way the file is counted (`loader.num_skipped`) and logged once.
- "dali": NVIDIA DALI (dali), GPU JPEG decoding. DALI cannot skip a file
  it fails to decode, so run `python -m rectok.data verify ROOT` once: it writes the exclusion
  list that both backends honour.

Sharding follows DistributedSampler: training draws a fresh permutation from `seed + epoch`
every epoch and gives every rank the same number of samples (the tail is dropped); evaluation
(`train=False`) gives each sample to exactly one rank, without padding duplicates, so ranks
may hold one sample more or less than each other.

Modules: sources (folders, file lists, exclusion lists), transforms (ADM crop, RandomResizedCrop),
dataset (decoding and unreadable files), sharding (the sampler and the loader base every loader
derives from), pil_loader, dali, loading (build_loader), verify (`python -m rectok.data verify`),
demo (the generated demo dataset).
"""
