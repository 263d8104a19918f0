"""Training memory per model preset and batch size, with and without activation checkpointing.

    python bench/memory.py                    # CPU: the tiny presets; GPU: the official ones
    python bench/memory.py --batches 1,2,4,8 --out bench/results

One training step per row (forward, loss, backward): the tokenizer's stage-1 forward with masking,
the forward flow and both decoders (its teacher's features stand in as a random target: the frozen
teacher keeps nothing for backward), and a DiT^DH velocity step. Two measures:
- saved activations: the bytes autograd keeps for backward (unique storages, parameters left
  out), counted with saved_tensors_hooks; exact and the same on every machine, and what
  checkpointing saves. The only measure on a CPU, whose process memory is too noisy to compare.
- peak GB (CUDA only): torch.cuda.max_memory_allocated over the step, weights and grads included.

Writes memory-<date>-<device>.{json,md} into --out (bench/results by default; "" writes nothing).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, peak_memory_mb, write_results  # noqa: E402
from rectok.environment import device_name, environment  # noqa: E402
from rectok.models.dit import DiTDH, dit_config  # noqa: E402
from rectok.models.layers import set_activation_checkpointing  # noqa: E402
from rectok.models.tokenizer import RecTok, tokenizer_config  # noqa: E402


def saved_activation_bytes(step: Callable[[], torch.Tensor], model: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves for backward while `step()` builds its graph: each storage
    once, the storages of `model`'s parameters and buffers (and their views: they exist anyway)
    left out. The graph is freed afterwards."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(seen.values())


def tokenizer_step(preset: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    tok = RecTok(tokenizer_config(preset)).to(device).train()
    size, dim = tok.cfg.img_size, tok.cfg.semantic_dim
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    target = torch.randn(batch, tok.cfg.seq_len, dim, device=device)

    def step() -> torch.Tensor:
        out = tok(x)
        return (out.images - x).square().mean() + (
            1 - torch.cosine_similarity(out.semantic, target, -1)
        ).mean()

    return tok, step


def dit_step(preset: str, batch: int, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    channels, grid = (16, 4) if preset == "dit-dh-tiny" else (128, 16)
    dit = DiTDH(dit_config(preset, in_channels=channels, grid_size=grid)).to(device).train()
    x = torch.randn(batch, channels, grid, grid, device=device)
    t, y = torch.rand(batch, device=device), torch.arange(batch, device=device) % 10

    def step() -> torch.Tensor:
        return (dit(x, t, y) - x).square().mean()

    return dit, step


def measure(model: torch.nn.Module, step: Callable, device: torch.device) -> dict:
    row = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    row["saved_MB"] = saved_activation_bytes(step, model) / 2**20

    def train_step() -> None:
        step().backward()
        model.zero_grad(set_to_none=True)

    peak = peak_memory_mb(train_step, device)
    row["peak_GB"] = peak / 1024 if peak is not None else None
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="", help="comma-separated batch sizes (default 1,2,4 / 1,8,32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default=str(RESULTS_DIR), help='results folder ("" = do not write)')
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    try:
        batches = [int(b) for b in (args.batches or ("1,8,32" if on_gpu else "1,2,4")).split(",")]
    except ValueError:
        p.error(f"--batches takes comma-separated integers, got {args.batches!r}")
    if min(batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches!r}")
    models = (
        [("tokenizer", "rectok-B"), ("dit", "dit-dh-xl"), ("dit", "dit-dh-s")]
        if on_gpu
        else [("tokenizer", "rectok-tiny"), ("dit", "dit-dh-tiny")]
    )
    rows = []
    for kind, preset in models:
        for batch in batches:
            for checkpointing in (False, True):
                build = tokenizer_step if kind == "tokenizer" else dit_step
                torch.manual_seed(0)  # the same weights and masking draws in every row
                try:
                    model, step = build(preset, batch, device)
                    set_activation_checkpointing(model, checkpointing)
                    row = measure(model, step, device)
                except torch.OutOfMemoryError:
                    row = {"note": "out of memory"}
                rows.append({"model": preset, "batch": batch, "checkpointing": checkpointing, **row})
                print(rows[-1], flush=True)
                del model, step
                if on_gpu:
                    torch.cuda.empty_cache()
    if args.out:
        stamp = datetime.date.today().isoformat()
        meta = {
            "device": device_name(device),
            "environment": environment(device),
            "note": "saved_MB: activations kept for backward (exact); peak_GB: CUDA max_memory_allocated "
            "over forward + backward, weights and grads included (GPU only).",
        }
        columns = [
            ("model", "model"),
            ("batch", "batch"),
            ("checkpointing", "activation checkpointing"),
            ("params_M", "params (M)"),
            ("saved_MB", "saved activations (MB)"),
            ("peak_GB", "peak (GB)"),
        ]
        tag = "gpu" if on_gpu else "cpu"
        path = write_results(rows, meta, Path(args.out), f"memory-{stamp}-{tag}", columns)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
