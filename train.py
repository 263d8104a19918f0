"""Train the RecTok tokenizer (stage 1), fine-tune its pixel decoder (stage 2), or train DiT^DH.

    python train.py                      # CPU demo: tiny tokenizer on generated images, ~3-4 min
    python train.py --stage decoder      # tiny stage 2 from runs/demo
    python train.py --stage dit          # tiny DiT^DH on the demo tokenizer's latents
    torchrun --nproc_per_node 8 train.py --stage tokenizer --preset rectok-B --data.path /data/imagenet
    torchrun --nnodes 4 --node_rank $R --master_addr $A --nproc_per_node 8 train.py ...   # multi-node

Configuration: rectok/training/config.py (defaults -> preset -> --config JSON -> --key value);
`python train.py --help` lists every key. Everything a run writes lives in --run_dir:
ckpt_*.pt + `latest` + manifest.json (resume with --resume auto), config.json, environment.json,
metrics.jsonl, TensorBoard events (tb/), images/*.png, the EMA weights as safetensors,
and metrics.json at the end.

SPEC sections implemented (the stages live in rectok/training/): 2 (masking, posterior sample,
forward flow; inside RecTok.forward), 4 (losses), 5 (tokenizer recipe), 6 (DiT^DH objective and recipe).
"""

from __future__ import annotations

import sys
from typing import Any

from rectok.training import distributed as D
from rectok.training.config import parse_args
from rectok.training.decoder_stage import train_decoder
from rectok.training.dit_stage import train_dit
from rectok.training.reports import write_summary
from rectok.training.runtime import NonFiniteLossError, Run
from rectok.training.tokenizer_stage import train_tokenizer

STAGES = {"tokenizer": train_tokenizer, "decoder": train_decoder, "dit": train_dit}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the stage, write metrics.json; returns the stage's result dict
    (loss history, steps, wall time, held-out PSNR for the tokenizer stages, the model and its EMA)."""
    cfg = parse_args(argv)
    run = Run(cfg)
    try:
        result = STAGES[cfg.stage](cfg, run)
        write_summary(run, cfg, result)
        return result
    finally:
        run.close()
        D.shutdown()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(3)
    except ValueError as err:  # bad configuration or data: a message, not a traceback
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # the machine: a missing or unreadable file, a read-only or full disk
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(4)
