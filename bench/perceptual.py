"""Perceptual-loss benchmark: the frozen LPIPS-VGG16 + ConvNeXt-S forwards and the backward to the
reconstruction, in each speed setting of losses.PerceptualLoss.

Variants: fp32 NCHW (the release), fp32 channels_last, bf16 NCHW, bf16 channels_last, and the
last one under torch.compile (what train.py --compile does with it). Random weights (timing only).
Each variant's loss is checked against the release setting first (bf16 to 5e-2 relative, fp32 to
1e-4). On a GPU: batch 64 at 256 px, ConvNeXt at 224 (stage 1 of rectok-B); on a CPU a small
case, for the code path only.

    python bench/perceptual.py [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rectok.environment import device_name, environment  # noqa: E402
from rectok.training.losses import PerceptualLoss  # noqa: E402

VARIANTS = {  # name -> (precision, channels_last, compiled)
    "fp32": ("fp32", False, False),
    "fp32 channels_last": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16 channels_last": ("bf16", True, False),
    "bf16 channels_last compiled": ("bf16", True, True),
}
COLUMNS = [
    ("variant", "variant"),
    ("ms", "ms fwd+bwd"),
    ("speedup", "vs fp32"),
    ("loss_rel_diff", "loss rel diff"),
]


def build(precision: str, channels_last: bool, resize: int, device: torch.device) -> PerceptualLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn loudly, as they should elsewhere
        torch.manual_seed(0)
        return PerceptualLoss("random", resize=resize, precision=precision, channels_last=channels_last).to(
            device
        )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch, px, resize = (64, 256, 224) if on_gpu else (2, 64, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, px, px, generator=g).to(device)
    x_hat = (x + 0.05 * torch.randn(x.shape, generator=g).to(device)).clamp(0, 1)
    rows, reference, base_ms = [], None, None
    for name, (precision, channels_last, compiled) in VARIANTS.items():
        if compiled and args.no_compile:
            continue
        loss_fn = build(precision, channels_last, resize, device)
        if compiled:
            torch._dynamo.reset()
            loss_fn.compile()
        inp = x_hat.clone().requires_grad_()

        def step(fn=loss_fn, inp=inp) -> torch.Tensor:
            loss = fn(inp, x)
            loss.backward()
            inp.grad = None
            return loss

        start = time.perf_counter()
        value = step().item()
        first_s = time.perf_counter() - start
        reference = value if reference is None else reference
        ms = common.time_ms(step, device, quick=args.quick)
        base_ms = ms if base_ms is None else base_ms
        rows.append(
            {
                "variant": name,
                "ms": ms,
                "speedup": base_ms / ms,
                "loss_rel_diff": abs(value - reference) / abs(reference),
                "first_call_s": round(first_s, 1),
            }
        )
        print(
            f"  {name:30s} {ms:9.2f} ms  x{base_ms / ms:.2f}  loss rel diff {rows[-1]['loss_rel_diff']:.1e}"
        )
        tol = 5e-2 if precision == "bf16" else 1e-4
        if rows[-1]["loss_rel_diff"] > tol:
            rows[-1]["error"] = f"loss off the fp32 one by more than {tol}"
    meta = {
        "device": device_name(device),
        "environment": environment(device),
        "note": f"batch {batch}, {px} px, ConvNeXt at {resize} px, random weights; ms of forward + backward",
    }
    stamp = time.strftime("%Y-%m-%d")
    tag = device_name(device).split(" (")[0].replace(" ", "-")
    common.write_results(rows, meta, args.out, f"perceptual-{stamp}-{tag}", COLUMNS + [("error", "note")])
    return rows


if __name__ == "__main__":
    main()
