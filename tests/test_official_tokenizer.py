"""Proves that our tokenizer computes what the official RecTok release computes, and that
official-layout checkpoints load, save and fail cleanly.

- Parity (fp32, CPU): every tensor recorded from the official code in
  tokenizer_tiny_io.safetensors is reproduced within 1e-5 * max(1, max|ref|) from
  the official-layout weights; the per-tensor max error is printed (run with -s).
- Round trip: tokenizer_to_official -> load_official_tokenizer, through a dict, a .safetensors
  file and a .pth file, gives back bit-identical weights and outputs.
- Broken checkpoints (missing / unexpected key, wrong shape, non-state-dict .pth,
  pickled custom objects, unknown widths) raise ValueError naming the problem.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rectok.checkpoints.official import load_official_tokenizer, save_official
from rectok.checkpoints.official_tokenizer import infer_config, tokenizer_to_official
from rectok.models import flow
from rectok.models.tokenizer import DiagonalGaussian, RecTok, tokenizer_config, tokenizer_rope_table

IO_KEYS = [
    "enc_moments_eval",
    "enc_moments_masked",
    "dec_from_mean",
    "reconstruct_eval",
    "sem_from_mean",
    "dec_from_zt_masked",
    "sem_from_zt_masked",
    "z_t",
    "tau",
    "rope_table",
    "kl_eval",
]


@functools.cache
def _official_run(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(reference tensors, our tensors) for the tiny official tokenizer; computed once per session."""
    meta = json.loads((folder / "meta.json").read_text())["tokenizer_tiny"]
    io = load_file(str(folder / "tokenizer_tiny_io.safetensors"))
    model = load_official_tokenizer(folder / "tokenizer_tiny_official_state.safetensors").eval()
    cfg = model.cfg
    assert (cfg.img_size, cfg.patch_size, cfg.token_channels, cfg.semantic_dim) == (
        meta["img_size"],
        meta["patch_size"],
        meta["token_channels"],
        meta["semantic_dim"],
    )
    assert cfg.shift == pytest.approx(meta["timestep_shift"])
    x, ids_restore = io["x"], io["ids_restore"]
    ids_keep = io["ids_shuffle"][:, : int(io["len_keep"])]
    ours = {}
    with torch.no_grad():
        ours["enc_moments_eval"] = model.encoder(x)
        ours["enc_moments_masked"] = model.encoder(x, ids_keep)
        post = DiagonalGaussian(ours["enc_moments_eval"])
        ours["dec_from_mean"] = model.pixel_decoder(post.mean)
        ours["reconstruct_eval"] = model.reconstruct(x)
        ours["sem_from_mean"] = model.semantic_decoder(post.mean)
        ours["tau"] = flow.shift_tau(io["tau_uniform"], cfg.shift)
        visible_mean = DiagonalGaussian(ours["enc_moments_masked"]).mean
        ours["z_t"] = flow.forward_flow(visible_mean, io["eps"], ours["tau"])
        # Decoders get the reference z_t so that their check is independent of the encoder's.
        ours["dec_from_zt_masked"] = model.pixel_decoder(io["z_t"], ids_restore)
        ours["sem_from_zt_masked"] = model.semantic_decoder(io["z_t"], ids_restore)
        head_dim = cfg.encoder_width // cfg.encoder_heads
        ours["rope_table"] = tokenizer_rope_table(cfg.grid_size, head_dim)
        ours["kl_eval"] = post.kl()
    return io, ours


@pytest.mark.parametrize("key", IO_KEYS)
def test_parity_with_official(official_fixtures: Path, key: str) -> None:
    io, ours = _official_run(official_fixtures)
    ref, got = io[key], ours[key]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = (got - ref).abs().max().item()
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    print(f"\n[official parity] {key}: max |ours - ref| = {err:.3e} (tolerance {tol:.1e})")
    assert err <= tol, f"{key}: max error {err:.3e} > {tol:.1e}"


def test_encoder_rope_buffer_is_the_reference_table(official_fixtures: Path) -> None:
    io, _ = _official_run(official_fixtures)
    model = load_official_tokenizer(official_fixtures / "tokenizer_tiny_official_state.safetensors")
    assert torch.equal(model.encoder.rope_table, io["rope_table"])


def _random_tiny(seed: int = 0):
    """rectok-tiny with every tensor random, so that a dropped or swapped tensor shows."""
    torch.manual_seed(seed)
    model = RecTok(tokenizer_config("rectok-tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] == 192 else 0.0))
    return model


def _outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        mean = model.encode(x).mean
        return [mean, model.pixel_decoder(mean), model.semantic_decoder(mean)]


def _assert_same_model(a, b) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.rand(2, 3, a.cfg.img_size, a.cfg.img_size) * 2 - 1
    for oa, ob in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.equal(oa, ob)


def test_official_layout_key_names() -> None:
    model = RecTok(tokenizer_config("rectok-tiny"))
    state = tokenizer_to_official(model)
    assert len(state) == len(model.state_dict())
    for key in (
        "encoder.patch_embed.0.weight",
        "encoder.positional_embedding",
        "encoder.transformer.2.attn.qkv.bias",
        "encoder.latent_head.weight",
        "decoder.decoder_embed.weight",
        "decoder.mask_token",
        "decoder.ffn.1.weight",
        "decoder.conv_out.weight",
        "sem_decoders.dinov3.token_embedding.weight",
        "sem_decoders.dinov3.mask_embedding",
        "sem_decoders.dinov3.out.weight",
    ):
        assert key in state, key


def test_fixture_checkpoint_has_exactly_our_keys(official_fixtures: Path) -> None:
    ref = load_file(str(official_fixtures / "tokenizer_tiny_official_state.safetensors"))
    ours = tokenizer_to_official(RecTok(tokenizer_config("rectok-tiny")))
    assert ours.keys() == ref.keys()
    assert all(ours[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("via", ["dict", "safetensors", "pth"])
def test_round_trip(tmp_path: Path, via: str) -> None:
    model = _random_tiny()
    if via == "dict":
        src = tokenizer_to_official(model)
    else:
        src = tmp_path / f"tok.{via}"
        save_official(model, src)
        assert not list(tmp_path.glob("*.tmp")), "save_official left a temporary file"
    _assert_same_model(model, load_official_tokenizer(src).eval())


def test_round_trip_without_semantic_decoder_and_other_channels() -> None:
    torch.manual_seed(1)
    model = RecTok(tokenizer_config("rectok-tiny", semantic_dim=0, token_channels=32))
    loaded = load_official_tokenizer(tokenizer_to_official(model))
    assert loaded.semantic_decoder is None and loaded.cfg.token_channels == 32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_teacher_weights_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    model = _random_tiny()
    state = tokenizer_to_official(model)
    state["sem_foundation_models.dinov3.embeddings.patch_embeddings.weight"] = torch.zeros(4, 3, 2, 2)
    with caplog.at_level(logging.INFO, logger="rectok.checkpoints.official_tokenizer"):
        loaded = load_official_tokenizer(state)
    assert "sem_foundation_models" in caplog.text
    _assert_same_model(model.eval(), loaded.eval())


def test_inferred_config_of_official_base_sizes() -> None:
    with torch.device("meta"):
        model = RecTok(tokenizer_config("rectok-B"))
    state = tokenizer_to_official(model)
    assert infer_config(state) == model.cfg
    assert infer_config(state, num_heads=6).encoder_heads == 6


def test_missing_key() -> None:
    state = tokenizer_to_official(_random_tiny())
    del state["decoder.transformer.1.mlp.w3.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['decoder.transformer.1.mlp.w3.bias'\]"):
        load_official_tokenizer(state)


def test_missing_size_defining_key() -> None:
    state = tokenizer_to_official(_random_tiny())
    del state["encoder.positional_embedding"]
    with pytest.raises(ValueError, match="encoder.positional_embedding"):
        load_official_tokenizer(state)


def test_unexpected_key() -> None:
    state = tokenizer_to_official(_random_tiny())
    state["encoder.sem_cls_token_embedding"] = torch.zeros(1, 1, 192)
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder.sem_cls_token_embedding'\]"):
        load_official_tokenizer(state)


def test_wrong_shape() -> None:
    state = tokenizer_to_official(_random_tiny())
    state["encoder.transformer.1.attn.proj.weight"] = torch.zeros(192, 191)
    with pytest.raises(
        ValueError, match=r"encoder.transformer.1.attn.proj.weight: checkpoint shape \(192, 191\)"
    ):
        load_official_tokenizer(state)


def test_unknown_width_needs_head_count() -> None:
    torch.manual_seed(0)
    model = RecTok(tokenizer_config(
        "rectok-tiny", encoder_width=96, encoder_heads=2, decoder_width=96, decoder_heads=2, semantic_dim=0
    ))
    state = tokenizer_to_official(model)
    with pytest.raises(ValueError, match="width 96 is not in the official size table"):
        load_official_tokenizer(state)
    assert load_official_tokenizer(state, num_heads=2).cfg == model.cfg


class _NotAStateDict:
    """A custom class: weights_only unpickling must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pth_holding_a_list(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_official_tokenizer(path)


def test_pth_holding_a_custom_object(tmp_path: Path) -> None:
    path = tmp_path / "object.pth"
    torch.save({"model": _NotAStateDict()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official_tokenizer(path)


def test_pth_with_non_tensor_entries(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pth"
    state = tokenizer_to_official(_random_tiny())
    state["encoder.latent_head.weight"] = "not a tensor"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="not tensors: \\['encoder.latent_head.weight'\\]"):
        load_official_tokenizer(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_official_tokenizer(tmp_path / "nope.safetensors")
