"""The paper's tokenizer ablations as named presets (`--ablation NAME`).

Proves: every ablation changes exactly the options it names on top of any tokenizer preset; "no-fsd"
feeds the semantic decoder the clean latent z while the pixel decoder keeps z_t; "align-only" /
"recon-only" restrict the semantic loss to the visible / masked tokens (and a step without masked
tokens still back-propagates, with zero gradient); a run records its ablation in config.json and
metrics.json; bad names and stages are refused.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_script

from rectok.models import flow
from rectok.models.tokenizer import RecTok, tokenizer_config
from rectok.training.config import ABLATIONS, _flatten, parse_args, train_config
from rectok.training.losses import semantic_loss, semantic_token_ids

train = load_script("train.py")


@pytest.mark.parametrize("preset", ["tiny", "rectok-B"])
@pytest.mark.parametrize("name", [n for n in ABLATIONS if n])
def test_each_ablation_changes_exactly_its_options(preset, name):
    base = _flatten(train_config("tokenizer", preset).to_dict())
    ablated = _flatten(train_config("tokenizer", preset, ablation=name).to_dict())
    changed = {k for k in base if base[k] != ablated[k]} - {"ablation"}
    expected = {k for k, v in ABLATIONS[name].items() if base[k] != v}  # c128 is rectok-B's own C
    assert changed == expected
    assert all(ablated[k] == v for k, v in ABLATIONS[name].items())
    assert ablated["ablation"] == name
    # The command line takes the same route, and explicit options still win over the ablation.
    cli = parse_args(["--stage", "tokenizer", "--preset", preset, "--ablation", name, "--seed", "7"])
    assert _flatten(cli.to_dict()) == {**ablated, "seed": 7}


def test_the_paper_rows_are_all_there():
    assert {"no-fsd", "align-only", "recon-only", "c16", "c32", "c64", "c128", "dinov2", "dinov3"} <= set(
        ABLATIONS
    )
    assert {f"schedule-{s}" for s in flow.SCHEDULES} <= set(ABLATIONS)


def test_bad_ablations_are_refused():
    with pytest.raises(ValueError, match="unknown ablation 'c7'; choose one of no-fsd"):
        parse_args(["--ablation", "c7"])
    with pytest.raises(ValueError, match="applies to the tokenizer stage, not --stage dit"):
        train_config("dit", "dit-dh-s", ablation="c16", dit__tokenizer_ckpt="t.pt")


def _draws(tok: RecTok, batch: int, ratio: float) -> flow.FlowDraws:
    g = torch.Generator().manual_seed(3)
    L, C = tok.cfg.seq_len, tok.cfg.token_channels
    keep = math.ceil(L * (1 - ratio))
    return flow.FlowDraws(
        mask_ratio=ratio,
        ids_shuffle=torch.stack([torch.randperm(L, generator=g) for _ in range(batch)]),
        posterior_noise=torch.randn(batch, keep, C, generator=g),
        tau=torch.full((batch,), 0.7),
        eps=torch.randn(batch, keep, C, generator=g),
    )


def test_no_fsd_feeds_the_semantic_decoder_the_clean_latent():
    torch.manual_seed(0)
    fsd = RecTok(tokenizer_config("rectok-tiny")).train()
    clean = RecTok(tokenizer_config("rectok-tiny", semantic_flow=False)).train()
    clean.load_state_dict(fsd.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    draws = _draws(fsd, 2, 0.25)
    out_fsd, out_clean = fsd(x, draws=draws), clean(x, draws=draws)
    torch.testing.assert_close(out_clean.images, out_fsd.images, rtol=0, atol=0)  # pixels: z_t both
    z = out_clean.posterior.mean + out_clean.posterior.std * draws.posterior_noise
    expected = clean.semantic_decoder(z, out_clean.mask.ids_restore)
    torch.testing.assert_close(out_clean.semantic, expected, rtol=0, atol=0)
    assert (out_fsd.semantic - out_clean.semantic).abs().max() > 1e-3  # FSD really reads z_t


def test_semantic_loss_on_visible_or_masked_tokens_only():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    mask = flow.random_masking_ids(2, 16, 0.25, g)
    per_token = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1)  # [B, L]
    visible = semantic_token_ids(mask, "visible")
    masked = semantic_token_ids(mask, "masked")
    assert semantic_token_ids(mask, "all") is None
    assert visible.shape == (2, 12) and masked.shape == (2, 4)
    assert set(visible[0].tolist()) | set(masked[0].tolist()) == set(range(16))
    torch.testing.assert_close(semantic_loss(pred, target, visible), per_token.gather(1, visible).mean())
    torch.testing.assert_close(semantic_loss(pred, target, masked), per_token.gather(1, masked).mean())
    torch.testing.assert_close(semantic_loss(pred, target), per_token.mean())
    # No masked token this step (ratio 0): zero loss, and the graph still reaches the prediction.
    none_masked = semantic_token_ids(flow.random_masking_ids(2, 16, 0.0, g), "masked")
    leaf = pred.clone().requires_grad_(True)
    loss = semantic_loss(leaf, target, none_masked)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(pred))


def test_a_run_records_its_ablation(demo_16, tmp_path):
    args = [
        "--data.path", str(demo_16), "--run_dir", str(tmp_path), "--global_batch", "4", "--micro_batch", "4",
        "--max_steps", "2", "--log_every", "1", "--image_every", "0", "--ckpt_every", "0",
        "--tensorboard", "false", "--data.eval_images", "2", "--data.num_workers", "0",
        "--ablation", "recon-only",
    ]  # fmt: skip
    res = train.main(args)
    assert all(math.isfinite(v) for v in res["history"])
    assert json.loads((tmp_path / "metrics.json").read_text())["ablation"] == "recon-only"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ablation"] == "recon-only" and saved["loss"]["semantic_tokens"] == "masked"
