"""Under torch.compile, which of an op's two paths `auto` traces: our Triton kernel or the reference.

Our kernels reach Inductor as opaque custom ops, so tracing one costs the fusions Inductor would
make of the PyTorch reference with its neighbours (a norm into the next matmul's prologue, an
elementwise op into the previous kernel's epilogue). A kernel earns its place under compile only
if a benchmark shows it ahead of torch.compile(reference) (docs/KERNELS.md): bench/kernels.py on a
GPU times both ("compile:ours" and "compile") at the project's shapes and writes
`kernel-choices-<date>-<gpu>.json`, which `choices_from_rows` derives: "triton" for an op only
where its compiled kernel was faster, forward + backward, at every shape measured.

The table used is the JSON file named by RECTOK_KERNEL_CHOICES when Python starts (or one given to
`set_choices`), else `MEASURED` below (the newest committed measurement); an op missing from it
traces its reference ("inductor"). Eager `auto` is not affected: it runs Triton for CUDA tensors
(our kernels beat eager PyTorch, and nothing fuses there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

CHOICES = ("triton", "inductor")
OPS = (
    "flow_interpolate",
    "velocity_mse",
    "cosine_distill_loss",
    "rms_norm",
    "rms_norm_modulate",
    "swiglu",
    "apply_rope",
    "rope_qkv",
)

# Measured defaults, op -> choice, from a committed kernel-choices JSON of bench/kernels.py.
# Empty: no GPU measurement exists yet, so every op traces its reference under compile.
MEASURED: dict[str, str] = {}


def _checked(table: dict, source: str) -> dict[str, str]:
    bad = {op: c for op, c in table.items() if op not in OPS or c not in CHOICES}
    if bad:
        raise ValueError(
            f"{source}: unknown entries {bad}; ops are {', '.join(OPS)}, choices {', '.join(CHOICES)}"
        )
    return dict(table)


def load_choices(path: str | Path) -> dict[str, str]:
    """{op: "triton" | "inductor"} from a kernel-choices JSON ({"choices": {...}, ...})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"RECTOK_KERNEL_CHOICES={path}: not a readable kernel-choices JSON ({err})") from err
    table = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"RECTOK_KERNEL_CHOICES={path}: no 'choices' object (bench/kernels.py writes one)")
    return _checked(table, f"RECTOK_KERNEL_CHOICES={path}")


def _initial_table() -> dict[str, str]:
    path = os.environ.get("RECTOK_KERNEL_CHOICES", "").strip()
    return load_choices(path) if path else dict(MEASURED)


# Read once at import: a plain dict is free to read while torch.compile traces (file reads there
# would break the graph).
_table = _initial_table()


def set_choices(table: dict[str, str]) -> None:
    """Replace the table in force (e.g. with load_choices(path) after import); compile afterwards."""
    checked = _checked(table, "kernel-choice table")
    _table.clear()
    _table.update(checked)


def compiled_choice(op: str) -> str:
    """ "triton" or "inductor": what `auto` traces for `op` under torch.compile."""
    return _table.get(op, "inductor")


def choices_from_rows(rows: Iterable[dict]) -> dict:
    """The kernel-choices of bench/kernels.py result rows: per op and shape, the fwd+bwd ms of
    "compile:ours" against "compile"; an op gets "triton" only if it won at every shape."""
    ms: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        if row.get("mode") == "fwd+bwd" and row.get("impl") in ("compile", "compile:ours") and "ms" in row:
            ms.setdefault((row["op"], row["shape"]), {})[row["impl"]] = row["ms"]
    per_shape: dict[str, dict[str, dict]] = {}
    for (op, shape), pair in sorted(ms.items()):
        if op not in OPS or len(pair) < 2:
            continue
        winner = "triton" if pair["compile:ours"] < pair["compile"] else "inductor"
        per_shape.setdefault(op, {})[shape] = {
            "compile_ms": pair["compile"],
            "compile_ours_ms": pair["compile:ours"],
            "choice": winner,
        }
    choices = {
        op: "triton" if all(s["choice"] == "triton" for s in shapes.values()) else "inductor"
        for op, shapes in per_shape.items()
    }
    return {"choices": choices, "per_shape": per_shape}
