"""torch.compile applied from outside the models, at the scope measured fastest.

`--compile_scope` (`compile_model`):
- `modules`: each network compiled whole: the tokenizer's encoder, pixel decoder and semantic
  decoder, the DiT^DH, the perceptual loss (frozen LPIPS + ConvNeXt, one graph). Inductor then also
  fuses what sits between the blocks (the masking gather, the mask-token insert, unpatchify, the
  norms and heads). The random draws stay outside the graphs, in eager PyTorch, so a compiled run
  draws exactly what an eager run draws.
- `blocks`: every transformer block on its own (torchtitan's way). FSDP2 shards per block and
  registers hooks around each, which whole-module graphs would break on, so `auto` picks it there.
- `auto` (default): `blocks` under FSDP, `modules` otherwise.

Measured (bench/scaling.py, each row's base point, 2 CPU cores, float32; rectok-tiny / dit-dh-tiny):
`modules` is ahead of `blocks` on every row; the figures are in bench/results/scaling-*.md.

The networks' input length changes with the mask ratio every step. Dynamo compiles the first
length static and, at the next, one graph with a symbolic length that serves every later one
(automatic dynamic shapes; the decoders also get a static graph for one masked token, a size-1
block Dynamo specialises), so a run compiles each network at most three times
(tests/test_compiling.py). One symbolic graph costs ~1.5% against a static graph per length
(tok128 step on a CPU), and a static graph per length would mean ~100 compiles at 256 px: so no
length buckets.
"""

from __future__ import annotations

from torch import nn

COMPILE_SCOPES = ("auto", "modules", "blocks")
# torch.compile's modes. reduce-overhead records CUDA graphs of the compiled graphs (one per shape):
# it pays where launches dominate, e.g. the DiT^DH step with its static shapes; not measured on a
# GPU yet, so not a default. On a CPU it runs as default.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def resolve_scope(scope: str, fsdp: bool) -> str:
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}; got {scope!r}")
    if scope == "auto":
        return "blocks" if fsdp else "modules"
    return scope


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The modules `modules` scope compiles whole: a tokenizer's three networks, else the model."""
    from rectok.models.tokenizer import RecTok

    if isinstance(model, RecTok):
        parts = [model.encoder, model.pixel_decoder, model.semantic_decoder]
        return [p for p in parts if p is not None]
    return [model]


def compile_blocks(model: nn.Module, **options) -> int:
    """torch.compile every transformer block in place (nn.Module.compile: state-dict names unchanged);
    `options` go to torch.compile (tests pass a counting backend)."""
    from rectok.models.dit import AdaLNBlock
    from rectok.models.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, (Block, AdaLNBlock))]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def compile_model(
    model: nn.Module, scope: str = "modules", fsdp: bool = False, mode: str = "default", **options
) -> str:
    """torch.compile `model` in place at `scope` (see the module docstring) in `mode`; returns the
    scope used. nn.Module.compile keeps the state-dict names, so checkpoints are the same as eager ones."""
    scope = resolve_scope(scope, fsdp)
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode != "default":
        options["mode"] = mode
    if scope == "blocks":
        compile_blocks(model, **options)
    else:
        for unit in compile_units(model):
            unit.compile(**options)
    return scope
