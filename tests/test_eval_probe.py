"""Linear probing along the flow: the classifier, the flow features, the report and the CLI.

Proves: fit_linear_probe reaches scikit-learn's LogisticRegression optimum (same weights, same
predictions) for the matching L2 strength, and its Adam variant lands close; the eps of every
sample depends only on (seed, index), so features do not depend on the batch size; pooled
features equal (1 - tau) mean(z) + tau mean(eps) with z the posterior mean (first C of 2C
channels); accuracy on a class-separable stand-in tokenizer falls from ~100% at tau = 0 to
chance at tau = 1; the JSON / markdown / PNG report holds two labelled curves; and
`python -m rectok.eval probe` runs end to end on a tiny official-layout checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from rectok.eval.probe import (
    ProbeConfig,
    fit_linear_probe,
    markdown_table,
    pooled_flow_features,
    probe_accuracy,
    probe_along_flow,
    sample_noise,
    write_probe_report,
)


def _blobs(n: int, seed: int, classes: int = 5, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes with a per-dimension scale and offset (so standardising matters)."""
    g = torch.Generator().manual_seed(123)  # class means and scales shared by every split
    means = 0.4 * torch.randn(classes, dim, generator=g)
    scale, offset = torch.rand(dim, generator=g) * 5 + 0.2, torch.randn(dim, generator=g) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (means[y] + torch.randn(n, dim, generator=g)) * scale + offset
    return x, y


def test_linear_probe_matches_sklearn():
    xtr, ytr = _blobs(600, 0)
    xva, yva = _blobs(400, 1)
    cfg = ProbeConfig(weight_decay=1e-2)
    probe = fit_linear_probe(xtr, ytr, 5, cfg)

    mean, std = xtr.mean(0), xtr.std(0)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2; ours mean(CE) + wd / 2 ||W||^2, i.e. C = 1 / (wd N)
    sk = LogisticRegression(C=1.0 / (cfg.weight_decay * len(xtr)), max_iter=10_000, tol=1e-10)
    sk.fit(((xtr - mean) / std).double().numpy(), ytr.numpy())
    sk_pred = sk.predict(((xva - mean) / std).double().numpy())
    ours_pred = probe.predict(xva).numpy()

    ours_acc, sk_acc = (ours_pred == yva.numpy()).mean(), (sk_pred == yva.numpy()).mean()
    agree = (ours_pred == sk_pred).mean()
    w_err = np.abs(probe.weight.numpy() - sk.coef_.T).max() / np.abs(sk.coef_).max()
    print(f"\nprobe acc ours {ours_acc:.4f} sklearn {sk_acc:.4f}; agree {agree:.4f}; rel W err {w_err:.2e}")
    assert 0.5 < sk_acc < 0.99  # a problem where the classifier matters
    assert abs(ours_acc - sk_acc) <= 0.01
    assert agree >= 0.99
    assert w_err < 1e-3  # the same (unique, strictly convex) optimum
    assert probe_accuracy((xtr, ytr), (xva, yva), 5, cfg) == pytest.approx(ours_acc)


def test_adam_probe_lands_near_lbfgs():
    xtr, ytr = _blobs(600, 2)
    xva, yva = _blobs(400, 3)
    lbfgs = probe_accuracy((xtr, ytr), (xva, yva), 5, ProbeConfig())
    adam = probe_accuracy(
        (xtr, ytr), (xva, yva), 5, ProbeConfig(optimizer="adam", epochs=60, lr=3e-2, batch_size=200)
    )
    assert abs(adam - lbfgs) <= 0.03


def test_probe_rejects_bad_inputs():
    x, y = _blobs(20, 4)
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe(x, y, 3, ProbeConfig())
    with pytest.raises(ValueError, match="optimizer"):
        ProbeConfig(optimizer="sgd")


def test_noise_depends_only_on_seed_and_index():
    full = sample_noise(range(6), (4, 3), seed=7)
    np.testing.assert_array_equal(sample_noise([2, 3], (4, 3), seed=7), full[2:4])
    assert not torch.equal(sample_noise(range(6), (4, 3), seed=8), full)
    assert not torch.equal(full[0], full[1])


class PatchMeanTokenizer(torch.nn.Module):
    """RecTok interface stand-in: tokens are per-patch mean colours (C = 3, 4x4 patches); the
    log-variance half is a large constant, so using the wrong half would destroy the signal."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.encoder = self._encode

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2) * self.scale  # (B, L, 3)
        return torch.cat([z, torch.full_like(z, 5.0)], -1)  # (B, L, 6)


def _colour_dataset(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """16x16 images in [-1, 1] of 3 classes: class k has a brighter channel k, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        k = i % 3
        x = 0.6 * torch.randn(3, 16, 16, generator=g)
        x[k] += 0.5
        items.append((x.clamp(-1, 1), k))
    return items


def _loader(items, batch_size: int):
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False)


def test_pooled_features_follow_the_flow_and_ignore_batch_size():
    items = _colour_dataset(7, 0)
    tok = PatchMeanTokenizer()
    taus = (0.0, 0.3, 1.0)
    feats, labels = pooled_flow_features(tok, _loader(items, 3), taus, seed=5, progress=False)
    feats_b, labels_b = pooled_flow_features(tok, _loader(items, 7), taus, seed=5, progress=False)
    for t in taus:
        torch.testing.assert_close(feats[t], feats_b[t], rtol=0, atol=0)
    assert labels.tolist() == [i % 3 for i in range(7)] and torch.equal(labels, labels_b)

    x = torch.stack([it[0] for it in items])
    zbar = torch.nn.functional.avg_pool2d(x, 4).flatten(2).mean(2)  # (N, 3): mean over tokens
    epsbar = sample_noise(range(7), (16, 3), seed=5).mean(1)
    torch.testing.assert_close(feats[0.0], zbar)
    torch.testing.assert_close(feats[1.0], epsbar)
    torch.testing.assert_close(feats[0.3], 0.7 * zbar + 0.3 * epsbar)

    few, few_labels = pooled_flow_features(tok, _loader(items, 3), taus, seed=5, max_images=4, progress=False)
    assert len(few_labels) == 4
    torch.testing.assert_close(few[0.3], feats[0.3][:4], rtol=0, atol=0)


def test_probe_along_flow_and_report(tmp_path):
    train, val = _colour_dataset(150, 1), _colour_dataset(90, 2)
    taus = (0.0, 0.5, 0.8, 1.0)
    results = {
        "tokenizer A": probe_along_flow(
            PatchMeanTokenizer(), _loader(train, 50), _loader(val, 50), taus, progress=False
        ),
        # latents 10x smaller: the same noise drowns them at a smaller tau (the curve FSD lifts)
        "tokenizer B": probe_along_flow(
            PatchMeanTokenizer(0.1), _loader(train, 50), _loader(val, 50), taus, progress=False
        ),
    }
    acc_a, acc_b = results["tokenizer A"]["accuracy"], results["tokenizer B"]["accuracy"]
    print(f"\nprobe A {acc_a}\nprobe B {acc_b}")
    assert acc_a[0.0] >= 0.95 and acc_b[0.0] >= 0.95
    assert acc_a[1.0] <= 0.55 and acc_b[1.0] <= 0.55  # chance is 1/3
    assert acc_a[0.5] > acc_b[0.5] + 0.2
    assert results["tokenizer A"]["num_train"] == 150 and results["tokenizer A"]["num_classes"] == 3

    paths = write_probe_report(results, tmp_path / "probe", meta={"preset": "unit-test"})
    saved = json.loads(paths["json"].read_text())
    assert saved["meta"] == {"preset": "unit-test"}
    assert saved["probe"]["tokenizer A"]["accuracy"]["0.5"] == pytest.approx(acc_a[0.5])
    md = paths["md"].read_text().strip().splitlines()
    assert md[2] == "| tau | tokenizer A | tokenizer B |" and len(md) == 4 + len(taus)
    assert md[4].startswith("| 0 | ") and f"{100 * acc_b[0.5]:.2f}" in md[5]
    png = Image.open(paths["png"])
    assert png.format == "PNG" and png.size[0] > 300

    with pytest.raises(ValueError, match="taus"):
        probe_along_flow(
            PatchMeanTokenizer(), _loader(train, 50), _loader(val, 50), (0.0, 1.5), progress=False
        )
    unlabelled = [(x, -1) for x, _ in val]
    with pytest.raises(ValueError, match="class labels"):
        probe_along_flow(
            PatchMeanTokenizer(), _loader(train, 50), _loader(unlabelled, 50), (0.0,), progress=False
        )


def test_markdown_table_marks_missing_taus():
    table = markdown_table({"a": {0.0: 0.5, 0.5: 0.25}, "b": {0.0: 1.0}})
    assert table.splitlines()[3] == "| 0.5 | 25.00 | - |"


def test_probe_cli_on_tiny_official_checkpoint(tmp_path):
    from rectok.checkpoints.official import save_official
    from rectok.eval.cli import main
    from rectok.models.tokenizer import RecTok, tokenizer_config

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_official(RecTok(tokenizer_config("rectok-tiny")), ckpt)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for k, colour in enumerate(((200, 30, 30), (30, 30, 200))):
            (tmp_path / split / f"class{k}").mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(colour) + rng.normal(0, 20, (80, 96, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / split / f"class{k}" / f"{i}.png")
    out = tmp_path / "report"
    main([
        "probe", "--checkpoint", str(ckpt), "--checkpoint", str(ckpt), "--label", "run1", "--label", "run2",
        "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--train-per-class", "3",
        "--taus", "0,1", "--device", "cpu", "--num-workers", "0", "--batch-size", "4", "--out", str(out),
        "--meta", "what=cli-test", "--no-progress",
    ])  # fmt: skip
    saved = json.loads((out / "probe.json").read_text())
    assert set(saved["probe"]) == {"run1", "run2"} and saved["meta"] == {"what": "cli-test"}
    assert saved["probe"]["run1"]["num_train"] == 6 and saved["probe"]["run1"]["num_val"] == 4
    assert (
        saved["probe"]["run1"]["accuracy"] == saved["probe"]["run2"]["accuracy"]
    )  # same checkpoint, same seed
    assert (out / "probe.png").is_file() and "| tau | run1 | run2 |" in (out / "probe.md").read_text()
