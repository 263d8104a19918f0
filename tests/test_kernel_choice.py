"""The per-op choice `auto` makes under torch.compile (kernels/compiled_choice.py).

Proves: bench/kernels.py rows give "triton" for an op only where its compiled kernel beat
torch.compile(reference) at every shape; a bad choices file is refused with the reason; `auto`
follows the table while compiling and runs Triton eagerly on CUDA either way; the table named by
RECTOK_KERNEL_CHOICES is the one in force.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from rectok.kernels import backend
from rectok.kernels import compiled_choice as cc


def _rows(op: str, shape: str, compiled_ms: float, ours_ms: float) -> list[dict]:
    return [
        {"op": op, "shape": shape, "impl": "compile", "mode": "fwd+bwd", "ms": compiled_ms},
        {"op": op, "shape": shape, "impl": "compile:ours", "mode": "fwd+bwd", "ms": ours_ms},
        {"op": op, "shape": shape, "impl": "compile:ours", "mode": "fwd", "ms": 0.001},  # not fwd+bwd
    ]


def test_choices_need_a_win_at_every_shape():
    rows = [
        *_rows("rms_norm", "a", 2.0, 1.0),
        *_rows("rms_norm", "b", 3.0, 2.5),
        *_rows("swiglu", "a", 2.0, 1.0),
        *_rows("swiglu", "b", 2.0, 2.2),  # loses at one shape
        {"op": "flow_interpolate", "shape": "a", "impl": "compile", "mode": "fwd+bwd", "ms": 1.0},
    ]
    out = cc.choices_from_rows(rows)
    assert out["choices"] == {"rms_norm": "triton", "swiglu": "inductor"}  # no pair: no entry
    assert out["per_shape"]["swiglu"]["b"]["choice"] == "inductor"
    assert out["per_shape"]["swiglu"]["a"]["compile_ours_ms"] == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not a readable"),
        ('{"rows": []}', "no 'choices'"),
        ('{"choices": {"rms_norm": "cuda"}}', "unknown entries"),
        ('{"choices": {"layer_norm": "triton"}}', "unknown entries"),
    ],
)
def test_bad_choices_file_is_refused(tmp_path, text, message):
    path = tmp_path / "choices.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        cc.load_choices(path)


def test_auto_follows_the_table_while_compiling(monkeypatch):
    cuda = SimpleNamespace(is_cuda=True)  # use_triton reads only .is_cuda
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    saved = dict(cc._table)
    try:
        cc.set_choices({"rms_norm": "triton", "swiglu": "inductor"})
        with backend.use_backend("auto"):
            assert backend.use_triton(cuda, op="swiglu")  # eager: Triton on CUDA
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            assert backend.use_triton(cuda, op="rms_norm")
            assert not backend.use_triton(cuda, op="swiglu")
            assert not backend.use_triton(cuda, op="apply_rope")  # unmeasured: the reference
        with backend.use_backend("triton"):  # an explicit backend is not second-guessed
            assert backend.use_triton(cuda, op="swiglu")
        with pytest.raises(ValueError, match="kernel-choice table: unknown entries"):
            cc.set_choices({"rms_norm": "fast"})
    finally:
        cc.set_choices(saved)


def test_environment_names_the_table(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"choices": {"rms_norm": "triton"}}))
    code = (
        "from rectok.kernels import compiled_choice as c; "
        "print(c.compiled_choice('rms_norm'), c.compiled_choice('swiglu'))"
    )
    env = {**os.environ, "RECTOK_KERNEL_CHOICES": str(path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["triton", "inductor"]
    path.write_text("{}")
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "no 'choices'" in bad.stderr
