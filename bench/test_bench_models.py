"""The model benchmark cases of bench/models.py through pytest-benchmark.

    pytest bench/test_bench_models.py --benchmark-enable [--benchmark-json out.json]

One optimizer step of each training case (tokenizer stage 1, DiT^DH) per mode the device runs,
and one AutoGuidance Euler step plus decoding. Official presets on a GPU, tiny ones on a CPU.
With benchmarks disabled (the project default) each runs once, as a smoke test.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models as model_bench  # noqa: E402

from rectok import kernels  # noqa: E402
from rectok.training.compiling import compile_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = model_bench.MODES if DEVICE.type == "cuda" else ("eager", "compile")


@functools.cache
def _case(name: str) -> model_bench.TrainCase:
    return {"tokenizer": model_bench.tokenizer_case, "dit": model_bench.dit_case}[name](DEVICE)


def _finite_params(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tokenizer", "dit"])
def test_train_step(benchmark, name, mode):
    case = _case(name)
    if "compile" in mode:
        torch._dynamo.reset()
    model, step = case.build()
    if "compile" in mode:
        compile_model(model)
    fwd = model
    before = [p.detach().clone() for p in model.parameters()]
    benchmark.group = f"train {case.name} (batch {case.batch})"
    with kernels.use_backend(model_bench.backend_of(mode)):
        benchmark(functools.partial(step, fwd))
        model_bench.sync(DEVICE)
    assert _finite_params(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step trained


def test_sample_step(benchmark):
    from rectok.models.tokenizer import RecTok, tokenizer_config
    from rectok.sampling.generate import Sampler, SamplerConfig, index_noise

    on_gpu = DEVICE.type == "cuda"
    tok = RecTok(tokenizer_config("rectok-B" if on_gpu else "rectok-tiny", semantic_dim=0))
    C, g = tok.cfg.token_channels, tok.cfg.grid_size
    presets = ("dit-dh-xl", "dit-dh-s") if on_gpu else ("dit-dh-tiny", "dit-dh-tiny")
    dit, weak = (model_bench.DiTDH(model_bench.dit_config(p, in_channels=C, grid_size=g)) for p in presets)
    cfg = SamplerConfig(
        num_points=2, guidance="autoguidance", scale=1.29, cuda_graph="on" if on_gpu else "off"
    )
    sampler = Sampler(dit, tok, (torch.zeros(C), torch.ones(C)), cfg, weak=weak, device=DEVICE)
    batch = 64 if on_gpu else 2
    noise, labels = index_noise(range(batch), (C, g, g), 0), torch.arange(batch) % dit.num_classes
    benchmark.group = "sample: one AutoGuidance Euler step + decode"
    images = benchmark(lambda: sampler.decode(sampler.latents(noise, labels)))
    assert images.shape == (batch, tok.cfg.img_size, tok.cfg.img_size, 3) and images.dtype.name == "uint8"
