"""sample.py and rectok/sampling/generate.py: generation from checkpoints to an ADM npz.

Proves, with tiny random models on CPU:
- an image depends only on (seed, sample index): batch sizes 2 and 3 give the same npz, a
  training checkpoint folder (ckpt_*.pt, EMA weights, stored latent statistics and tokenizer
  path) and the safetensors exports give the same images, another seed gives other images;
- splitting the samples over ranks (contiguous blocks, one shard each, merged in rank order)
  gives exactly the single-process npz;
- the npz is ADM's format (arr_0 uint8 [N, H, W, 3], arr_1 labels classes[i % K]) and the
  result JSON records the preset and how the run drifts from it;
- the decode path de-normalises with the stored statistics before the pixel decoder;
- a CUDA-graph failure falls back to plain calls with the same result, and says so;
- official-layout DiT^DH files load through the same path and reproduce the official
  AutoGuidance and CFG sampler outputs (fixtures, float32);
- user errors name their fix: the demo without a DiT^DH says which train.py command to run,
  AutoGuidance presets need --weak, official models need --latent-stats, and mismatched
  tokenizer / generator pairs are refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

from rectok.checkpoints import loading, store
from rectok.models.dit import DiTDH, dit_config
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.sampling import generate as gen
from rectok.training.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
C, GRID, CLASSES = 16, 4, 3


sample = load_script("sample.py")


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-zero weights everywhere (DiT^DH starts with zero adaLN / output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _models():
    tok = _perturb(RecTok(tokenizer_config("rectok-tiny", semantic_dim=0)), 1)
    dit = _perturb(DiTDH(dit_config("dit-dh-tiny", in_channels=C, grid_size=GRID, num_classes=CLASSES)), 2)
    weak_cfg = dit_config(
        "dit-dh-tiny",
        in_channels=C,
        grid_size=GRID,
        num_classes=CLASSES,
        hidden_size=(64, 96),
        depth=(1, 1),
        num_heads=(1, 3),
    )
    weak = _perturb(DiTDH(weak_cfg), 3)
    g = torch.Generator().manual_seed(4)
    stats = (torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5)
    return tok, dit, weak, stats


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny models written the ways train.py writes them: exports and a run folder."""
    root = tmp_path_factory.mktemp("ckpts")
    tok, dit, weak, (mean, std) = _models()
    out = {"root": root, "stats": (mean, std)}
    out["tok"] = store.export_safetensors(
        root / "tokenizer_ema.safetensors", tok.state_dict(), tok.cfg.to_dict()
    )
    for name, model in (("dit", dit), ("weak", weak)):
        out[name] = store.export_safetensors(
            root / f"{name}_ema.safetensors",
            model.state_dict(),
            asdict(model.config),
            latent_mean=mean.tolist(),
            latent_std=std.tolist(),
            tokenizer=str(out["tok"]),
        )
    # A training run folder: raw weights scrambled, the EMA holds the real ones.
    run = root / "dit_run"
    raw = _perturb(DiTDH(dit.config), 99)
    ema = EMA(dit, 0.999)
    state = {
        "model": raw.state_dict(),
        "ema": ema.state_dict(),
        "config": {"stage": "dit"},
        "model_config": asdict(dit.config),
        "latent_stats": {"mean": mean, "std": std},
        "tokenizer": str(out["tok"]),
    }
    store.save_checkpoint(run, state, step=5)
    out["run"] = run
    return out


def _run(files, tmp_path, *extra, name="s"):
    argv = ["--dit", str(files["dit"]), "--num-points", "4", "--num-samples", "5"]
    argv += ["--out", str(tmp_path), "--name", name, "--no-progress", "--device", "cpu", *extra]
    result = sample.main(argv)
    with np.load(tmp_path / f"{name}.npz") as f:
        return result, f["arr_0"], f["arr_1"]


def test_deterministic_and_batch_size_independent(files, tmp_path):
    res2, a2, y2 = _run(files, tmp_path, "--batch-size", "2", "--weak", str(files["weak"]), name="b2")
    _, a3, y3 = _run(files, tmp_path, "--batch-size", "3", "--weak", str(files["weak"]), name="b3")
    # The run folder (.pt, EMA weights, stats and tokenizer path inside) must give the same images.
    argv = ["--batch-size", "5", "--weak", str(files["weak"])]
    _, a_run, _ = _run(files, tmp_path, *argv, "--dit", str(files["run"]), name="run")
    _, other, _ = _run(
        files, tmp_path, "--batch-size", "2", "--weak", str(files["weak"]), "--seed", "1", name="o"
    )

    assert a2.dtype == np.uint8 and a2.shape == (5, 64, 64, 3)
    assert y2.tolist() == [0, 1, 2, 0, 1] == y3.tolist()
    # CPU matmuls of different batch sizes may round differently in the last bit: allow a rare
    # off-by-one gray level, never more.
    for b in (a3, a_run):
        diff = np.abs(a2.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert np.abs(a2.astype(int) - other.astype(int)).mean() > 1.0  # the seed matters
    assert a2.std() > 5  # not a constant image

    saved = json.loads((tmp_path / "b2.json").read_text())
    assert saved["preset"] == "demo" and saved["drifts_from_preset"]
    assert saved["overrides"]["num_points"] == {"preset": 150, "used": 4}
    assert saved["overrides"]["guidance"] == {"preset": "none", "used": "autoguidance"}
    assert saved["settings"]["scale"] == pytest.approx(1.29)
    assert saved["checkpoints"]["dit"]["sha256"] == store.sha256(files["dit"])
    assert res2["output"]["num_images"] == 5 and (tmp_path / "b2.png").is_file()
    assert not list(tmp_path.glob(".*rank*"))  # shards removed after the merge


def test_rank_split_merges_to_the_single_process_npz(files, tmp_path):
    tok, dit, weak, stats = _models()
    cfg = gen.SamplerConfig(num_points=3, guidance="cfg", scale=1.5, interval=(0.2, 1.0))
    sampler = gen.Sampler(dit, tok, stats, cfg, seed=7)
    labels = gen.class_labels(7, [2, 0])
    results = {}
    for world in (1, 3):
        path = tmp_path / f"w{world}.npz"
        for rank in range(world):
            block = gen.rank_slice(7, rank, world)
            shard = gen.open_shard(path, rank, world, len(block), (64, 64, 3))
            gen.generate_block(sampler, block, labels, shard, batch_size=2, pad=rank == 1)
            shard.flush()
            del shard
        gen.merge_shards(path, world, labels)
        with np.load(path) as f:
            results[world] = (f["arr_0"], f["arr_1"])
    assert [len(gen.rank_slice(7, r, 3)) for r in range(3)] == [3, 2, 2]
    assert results[1][1].tolist() == [2, 0, 2, 0, 2, 0, 2]
    np.testing.assert_array_equal(results[1][1], results[3][1])
    diff = np.abs(results[1][0].astype(int) - results[3][0].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_noise_depends_on_seed_and_index_only():
    a = gen.index_noise([0, 1, 2, 3], (C, GRID, GRID), seed=3)
    b = gen.index_noise([3, 1], (C, GRID, GRID), seed=3)
    torch.testing.assert_close(a[[3, 1]], b, rtol=0, atol=0)
    assert not torch.equal(a[0], gen.index_noise([0], (C, GRID, GRID), seed=4)[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], gen.index_noise([0], (C, GRID, GRID), seed=2**32 + 3)[0])  # no 32-bit wrap
    with pytest.raises(ValueError, match="seed"):
        gen.index_noise([0], (1,), seed=-1)


def test_decode_denormalizes_with_the_stored_statistics():
    tok, dit, _, (mean, std) = _models()
    sampler = gen.Sampler(dit, tok, (mean, std), gen.SamplerConfig(num_points=2))
    x = torch.randn(2, C, GRID, GRID)
    z = (x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).flatten(2).transpose(1, 2)  # (B, L, C)
    expected = torch.clamp(tok.pixel_decoder(z) * 0.5 + 0.5, 0, 1)
    expected = (expected * 255).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(sampler.decode(x), expected)


def test_official_dit_reproduces_the_official_sampler(official_fixtures):
    io = load_file(str(official_fixtures / "dit_dh_tiny_io.safetensors"))
    dit = loading.load_dit(official_fixtures / "dit_dh_tiny_official_state.safetensors")
    weak = loading.load_dit(official_fixtures / "dit_dh_tiny_weak_official_state.safetensors")
    assert dit.layout == "official" and dit.latent_stats is None
    c, grid = dit.model.config.in_channels, dit.model.config.grid_size
    tok = RecTok(tokenizer_config("rectok-tiny", img_size=grid * 16, token_channels=c, semantic_dim=0))
    identity = (torch.zeros(c), torch.ones(c))
    for guidance, key, w in (
        ("autoguidance", "sample_euler_autoguidance", weak.model),
        ("cfg", "sample_euler_cfg", None),
    ):
        cfg = gen.SamplerConfig(num_points=12, guidance=guidance, scale=1.29)
        sampler = gen.Sampler(dit.model, tok, identity, cfg, weak=w)
        assert sampler.shift == pytest.approx(2**0.5)  # sqrt(8 * 8 * 128 / 4096), the fixture's shift
        out = sampler.latents(io["sample_noise"], io["y"])
        ref = io[key]
        assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_official_models_need_latent_statistics(official_fixtures, tmp_path):
    tok = RecTok(tokenizer_config("rectok-tiny", img_size=128, token_channels=128, semantic_dim=0))
    tok_path = store.export_safetensors(tmp_path / "tok.safetensors", tok.state_dict(), tok.cfg.to_dict())
    dit = official_fixtures / "dit_dh_tiny_official_state.safetensors"
    argv = ["--dit", str(dit), "--tokenizer", str(tok_path), "--num-points", "2", "--num-samples", "1"]
    argv += ["--out", str(tmp_path), "--no-progress", "--device", "cpu", "--grid", "0"]
    with pytest.raises(SystemExit):
        sample.main(argv)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean": [0.0] * 128, "std": [1.0] * 128}))
    result = sample.main([*argv, "--latent-stats", str(stats)])
    assert result["checkpoints"]["dit"]["layout"] == "official"
    assert result["checkpoints"]["latent_stats"] == str(stats)


def test_user_errors_name_the_fix(files, tmp_path, monkeypatch, capsys, official_fixtures):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the no-argument run has nothing to load
    with pytest.raises(SystemExit):
        sample.main([])
    err = capsys.readouterr().err
    assert "python train.py --stage dit" in err and "python train.py " in err and "runs/demo-dit" in err

    with pytest.raises(SystemExit):
        sample.main(["--dit", str(files["dit"]), "--preset", "paper-autoguidance"])
    assert "--weak" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        sample.main(["--dit", str(files["dit"]), "--scale", "2"])
    assert "--cfg-scale" in capsys.readouterr().err

    weak, meta = store.read_safetensors(files["weak"])
    mean, std = files["stats"]
    cfg = meta["config"]
    other = store.export_safetensors(
        tmp_path / "weak_other.safetensors",
        weak,
        cfg,
        latent_mean=(mean + 1).tolist(),
        latent_std=std.tolist(),
    )
    with pytest.raises(SystemExit):
        sample.main(["--dit", str(files["dit"]), "--weak", str(other), "--device", "cpu"])
    assert "other latent statistics" in capsys.readouterr().err

    official_tok = official_fixtures / "tokenizer_tiny_official_state.safetensors"  # C = 16 vs the DiT's 128
    official_dit = official_fixtures / "dit_dh_tiny_official_state.safetensors"
    with pytest.raises(SystemExit):
        sample.main(
            ["--dit", str(official_dit), "--tokenizer", str(official_tok), "--latent-stats", "x.json"]
        )
    assert "latent statistics file not found" in capsys.readouterr().err
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"mean": [0.0] * 128, "std": [1.0] * 128}))
    argv = ["--dit", str(official_dit), "--tokenizer", str(official_tok), "--latent-stats", str(stats)]
    with pytest.raises(SystemExit):
        sample.main([*argv, "--device", "cpu"])
    assert "pair models trained together" in capsys.readouterr().err


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError, match="guidance"):
        gen.SamplerConfig(guidance="magic")
    tok, dit, weak, stats = _models()
    with pytest.raises(ValueError, match="weak model"):
        gen.Sampler(dit, tok, stats, gen.SamplerConfig(guidance="autoguidance"))
    with pytest.raises(ValueError, match="CUDA"):
        gen.Sampler(dit, tok, stats, gen.SamplerConfig(cuda_graph="on"))
    bad = replace(tokenizer_config("rectok-tiny", semantic_dim=0), token_channels=8)
    with pytest.raises(ValueError, match="pair models"):
        gen.Sampler(dit, RecTok(bad), stats, gen.SamplerConfig())


def test_failed_cuda_graph_falls_back_to_plain_calls():
    tok, dit, _, stats = _models()
    sampler = gen.Sampler(dit, tok, stats, gen.SamplerConfig(num_points=3))
    noise, y = gen.index_noise([0, 1], (C, GRID, GRID), 0), torch.tensor([0, 2])
    expected = sampler.latents(noise, y)

    class Uncapturable(torch.nn.Module):
        num_classes = CLASSES

        def forward(self, x, t, y):
            raise RuntimeError("operation not permitted when stream is capturing")

    sampler.use_graphs, sampler.net = True, Uncapturable()  # what a failed capture looks like
    torch.testing.assert_close(sampler.latents(noise, y), expected, rtol=0, atol=0)
    assert not sampler.use_graphs and "CUDA-graph replay failed" in sampler.notes[0]
