"""FID / IS: the formula on known inputs, the inputs, the weights lookup, and agreement with torch-fidelity.

Proves:
- frechet_distance is 0 on identical statistics, matches the closed forms (1-D, diagonal), the
  scipy.linalg.sqrtm formula, torch-fidelity's and pytorch-fid's implementations on well-conditioned
  covariances, and stays real, finite and >= 0 on rank-deficient ones (N < D);
- inception_score matches torch-fidelity (no shuffling, 10 splits) and its limiting cases;
- ADM npz (`arr_0`) streaming, folders, limits and statistics files read what was written;
- a missing weights file raises FileNotFoundError naming the file and where to put it;
- end to end, `python -m rectok.eval fid/stats` and rFID of evaluate_reconstruction agree with
  torch_fidelity.calculate_metrics on the same images and the same weights.

Pretrained Inception weights cannot be downloaded here, so the end-to-end checks use a
random-weight network of torch-fidelity's exact architecture whose BatchNorm statistics are
calibrated on natural images (features are then spread out, not degenerate) and whose logits
are scaled so IS is far from 1. To keep CPU time small, both sides resize to 139 px instead of
299 (the same code path, with the class constant patched for both implementations).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage import data as skdata

from rectok.eval.cli import main
from rectok.eval.fid import (
    FIDStats,
    evaluate_samples,
    fid_metric_name,
    frechet_distance,
    inception_score,
    reference_stats,
)
from rectok.eval.image_io import ImageSource, LabelledImageFolder
from rectok.eval.inception import (
    POOL_FEATURES,
    WEIGHT_FILENAMES,
    build_inception,
    load_inception,
    resolve_inception_weights,
)
from rectok.eval.reconstruction import evaluate_reconstruction


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch and one BLAS thread: on the shared 2-core test machine, thread barriers under load
    made 2048x2048 eigendecompositions and Inception passes several times slower."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the formula


def _random_cov(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    """Well-conditioned SPD covariance (n=None) or the rank-(n-1) sample covariance of n points."""
    if n is None:
        a = rng.standard_normal((d, d))
        return a @ a.T / d + 0.5 * np.eye(d)
    return np.cov(rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d), rowvar=False)


def _fid_sqrtm(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    for d, n in ((64, None), (256, 40)):
        mu, s = rng.standard_normal(d), _random_cov(rng, d, n)
        fid = frechet_distance(mu, s, mu, s)
        assert 0.0 <= fid < 1e-9 * np.trace(s)


def test_closed_forms_1d_and_diagonal():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])
    ) == pytest.approx(9.0 + 1.0, rel=1e-12)
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 50), rng.uniform(0.0, 3.0, 50)
    b[:5] = 0.0  # singular second covariance
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_matches_sqrtm_torch_fidelity_and_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(2)
    d = 96
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[
        KEY_METRIC_FID
    ]
    assert ours == pytest.approx(_fid_sqrtm(mu1, s1, mu2, s2), rel=1e-9)
    assert ours == pytest.approx(tf, rel=1e-9)
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-7)


def test_rank_deficient_covariances_stay_real_and_agree():
    """N = 30 samples in D = 512 dims: both covariances have rank 29, the regime where sqrtm of a
    non-symmetric product goes complex. Ours must be a finite float; torch-fidelity (eigvals of
    S1 S2, real part of the square roots) computes the same quantity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(3)
    f1, f2 = rng.standard_normal((30, 512)), 0.8 * rng.standard_normal((30, 512)) + 0.1
    a, b = FIDStats.from_features(f1), FIDStats.from_features(f2)
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert isinstance(ours, float) and np.isfinite(ours) and ours > 0
    tf = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    assert ours == pytest.approx(tf[KEY_METRIC_FID], rel=1e-6)


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(4)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    est = FIDStats.from_features(x1), FIDStats.from_features(x2)
    assert frechet_distance(est[0].mu, est[0].sigma, est[1].mu, est[1].sigma) == pytest.approx(
        _fid_sqrtm(mu1, s1, mu2, s2), rel=0.02
    )


def test_frechet_rejects_bad_inputs():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu, s, mu, np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))


def test_inception_score_limits_and_torch_fidelity():
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    assert inception_score(np.zeros((50, 10)))[0] == pytest.approx(1.0)
    # each split of 8 holds 8 confident, distinct classes -> IS = 8
    confident = np.full((80, 1008), -50.0)
    confident[np.arange(80), np.arange(80) % 8] = 50.0
    assert inception_score(confident) == pytest.approx((8.0, 0.0), abs=1e-9)
    logits = np.random.default_rng(5).standard_normal((103, 1008)).astype(np.float32) * 4
    ours = inception_score(logits)
    tf = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    assert ours == pytest.approx((tf[KEY_METRIC_ISC_MEAN], tf[KEY_METRIC_ISC_STD]), rel=1e-9)


# ---------------------------------------------------------------- inputs and files


def _crops(names: tuple[str, ...], count: int, size: int, seed: int) -> np.ndarray:
    """`count` random 96x96 crops of skimage photos, resized: uint8 [count, size, size, 3]."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skdata, n)()[..., :3] for n in names]
    out = []
    for i in range(count):
        p = photos[i % len(photos)]
        top, left = rng.integers(0, p.shape[0] - 96), rng.integers(0, p.shape[1] - 96)
        crop = Image.fromarray(p[top : top + 96, left : left + 96]).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(crop))
    return np.stack(out)


def _write_folder(images: np.ndarray, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")


def test_npz_folder_and_array_sources(tmp_path):
    imgs = _crops(("astronaut", "coffee"), 11, 24, seed=0)
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=imgs)
    _write_folder(imgs, tmp_path / "folder")
    for src in (
        ImageSource(tmp_path / "samples.npz"),
        ImageSource(tmp_path / "compressed.npz"),
        ImageSource(tmp_path / "folder"),
        ImageSource(array=imgs),
    ):
        for bs in (1, 4, 11, 50):
            batches = list(src.batches(bs))
            assert [len(b) for b in batches][:-1] == [bs] * (len(batches) - 1)
            np.testing.assert_array_equal(np.concatenate(batches), imgs)
    limited = ImageSource(tmp_path / "samples.npz", limit=5)
    assert len(limited) == 5
    np.testing.assert_array_equal(np.concatenate(list(limited.batches(3))), imgs[:5])

    with pytest.raises(ValueError, match="limit"):
        ImageSource(tmp_path / "folder", limit=12)
    np.savez(tmp_path / "floats.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ImageSource(tmp_path / "floats.npz")
    np.savez(tmp_path / "other.npz", images=imgs)
    with pytest.raises(ValueError, match="arr_0"):
        ImageSource(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        ImageSource(tmp_path / "missing.npz")
    Image.fromarray(_crops(("chelsea",), 1, 30, seed=1)[0]).save(tmp_path / "folder" / "zz_other_size.jpg")
    with pytest.raises(ValueError, match="different sizes"):
        list(ImageSource(tmp_path / "folder").batches(20))


def test_center_crop_and_labelled_folder(tmp_path):
    for cls, name in (("b_cat", "chelsea"), ("a_rocket", "rocket")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(getattr(skdata, name)()).save(tmp_path / "data" / cls / f"{i}.jpg")
    src = ImageSource(tmp_path / "data", center_crop=32)
    assert next(src.batches(10)).shape == (6, 32, 32, 3)
    ds = LabelledImageFolder(tmp_path / "data", 32, per_class=2)
    assert ds.classes == ["a_rocket", "b_cat"] and ds.labels == [0, 0, 1, 1]
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 1 and -1.0 <= x.min() < x.max() <= 1.0


def test_statistics_files(tmp_path):
    rng = np.random.default_rng(6)
    stats = FIDStats.from_features(rng.standard_normal((20, 8)).astype(np.float32))
    stats.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz") as f:  # ADM layout: plain mu / sigma arrays
        assert set(f.keys()) == {"mu", "sigma", "num_images"}
        np.testing.assert_array_equal(f["sigma"], stats.sigma)
    loaded, desc = reference_stats(tmp_path / "ref.npz")  # no network needed for statistics
    assert loaded.num_images == 20 and "precomputed" in desc
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.savez(tmp_path / "adm_like.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu, sigma_s=stats.sigma)
    assert FIDStats.load(tmp_path / "adm_like.npz").num_images is None
    np.savez(tmp_path / "other.npz", x=stats.mu)
    with pytest.raises(ValueError, match="no FID statistics"):
        FIDStats.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="network"):
        reference_stats(ImageSource(array=np.zeros((2, 8, 8, 3), np.uint8)))


def test_metric_names():
    assert fid_metric_name("/data/VIRTUAL_imagenet256_labeled.npz") == "gFID-ADM"
    assert fid_metric_name("/stats/val50k.npz") == "FID-vs-val50k"
    assert fid_metric_name("/stats/val50k.npz", "rFID-val50k") == "rFID-val50k"


class ToyInception(torch.nn.Module):
    """Cheap stand-in with the extractor interface (features_list, uint8 [B, 3, H, W] -> tuple):
    "2048" = per-channel mean and std of the pixels, "logits_unbiased" = a fixed projection of them."""

    features_list = ["2048", "logits_unbiased"]

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5, bias=False)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    @staticmethod
    def numpy_features(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 255.0
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], 1)

    def forward(self, x: torch.Tensor):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = x.float().div(255).flatten(2)
        feats = torch.cat([f.mean(2), f.std(2, correction=0)], 1)
        return feats, 10 * self.proj(feats)


def test_evaluate_samples_from_folders_and_npz(tmp_path):
    a = _crops(("astronaut", "coffee"), 30, 16, seed=3)
    b = _crops(("rocket", "chelsea"), 25, 16, seed=4)
    np.savez(tmp_path / "a.npz", arr_0=a)
    _write_folder(b, tmp_path / "B")
    fa, fb = ToyInception.numpy_features(a), ToyInception.numpy_features(b)
    sa, sb = FIDStats.from_features(fa), FIDStats.from_features(fb)
    expected = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    net = ToyInception()
    res = evaluate_samples(
        ImageSource(tmp_path / "a.npz"), net, {}, tmp_path / "B", batch_size=7, progress=False
    )
    assert res["metrics"]["FID-vs-B"] == pytest.approx(expected, rel=1e-4)
    logits = 10 * fa @ net.proj.weight.detach().numpy().T
    assert (res["metrics"]["IS"], res["metrics"]["IS_std"]) == pytest.approx(
        inception_score(logits), rel=1e-4
    )
    assert res["reference"] == {"path": str(tmp_path / "B"), "content": "25 images", "num_images": 25}
    only_is = evaluate_samples(ImageSource(tmp_path / "B"), net, {}, None, progress=False)
    assert set(only_is["metrics"]) == {"IS", "IS_std"}
    with pytest.raises(ValueError, match="nothing to compute"):
        evaluate_samples(ImageSource(tmp_path / "B"), net, {}, None, compute_is=False)


# ---------------------------------------------------------------- weights


def test_missing_weights_error_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("RECTOK_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_inception_weights()
    msg = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "--inception-weights" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and "RECTOK_INCEPTION_WEIGHTS" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        main(["is", str(tmp_path), "--device", "cpu"])

    # found through the hub cache, the environment variable (file or folder) and an explicit path
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    hub_file = tmp_path / "hub" / "checkpoints" / WEIGHT_FILENAMES[1]
    hub_file.write_bytes(b"x")
    assert resolve_inception_weights() == hub_file
    monkeypatch.setenv("RECTOK_INCEPTION_WEIGHTS", str(tmp_path / "hub" / "checkpoints"))
    assert resolve_inception_weights() == hub_file
    assert resolve_inception_weights(hub_file) == hub_file


def test_weights_file_must_be_a_plain_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_inception(tmp_path / "list.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not FID Inception"):
        load_inception(tmp_path / "wrong.pth")


# ---------------------------------------------------------------- end to end vs torch-fidelity

RESIZE = 139  # both implementations resize to this instead of 299, for CPU time only
N_IMAGES = 20  # per image set


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(weights path, folder A, folder B): a BN-calibrated random Inception and two image sets."""
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    root = tmp_path_factory.mktemp("fid_e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", RESIZE)
        torch.manual_seed(0)
        tv = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=1008, init_weights=False
        )
        net = build_inception(tv.state_dict())
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: the running stats become this batch's stats
        calib = _crops(("astronaut", "coffee", "rocket", "hubble_deep_field"), 8, 64, seed=10)
        net.train()
        with torch.no_grad():
            net(torch.from_numpy(calib).permute(0, 3, 1, 2))
        state = {k: v.clone() for k, v in net.state_dict().items()}
        state["fc.weight"] *= 40.0  # spread the logits so that IS is far from 1
        torch.save(state, root / "inception_calibrated.pth")
        a = _crops(("astronaut", "coffee", "chelsea"), N_IMAGES, 64, seed=1)
        b = _crops(("rocket", "hubble_deep_field", "immunohistochemistry"), N_IMAGES, 64, seed=2)
        np.savez(root / "A.npz", arr_0=a)
        _write_folder(a, root / "A")
        _write_folder(b, root / "B")
        yield root / "inception_calibrated.pth", root / "A", root / "B"


def _torch_fidelity(weights, input1, input2=None, isc=False):
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(input1), input2=None if input2 is None else str(input2), cuda=False, isc=isc,
        fid=input2 is not None, feature_extractor_weights_path=str(weights), samples_shuffle=False,
        cache=False, verbose=False, batch_size=16, save_cpu_ram=True,
    )  # fmt: skip


@pytest.mark.slow
def test_fid_and_is_agree_with_torch_fidelity(calibrated, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights, dir_a, dir_b = calibrated
    common = [
        "--inception-weights",
        str(weights),
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", RESIZE)
        # ours: reference statistics of folder B written by `stats`, samples read from an ADM npz
        main(["stats", str(dir_b), "--out", str(tmp_path / "refB.npz"), "--no-progress", *common])
        out = ["--out", str(tmp_path / "fid.json"), "--meta", "preset=unit-test", "--no-progress"]
        main(["fid", str(dir_a.parent / "A.npz"), "--ref", str(tmp_path / "refB.npz"), *out, *common])
        ref = _torch_fidelity(weights, dir_a, dir_b, isc=True)

    res = json.loads((tmp_path / "fid.json").read_text())
    fid, is_mean, is_std = res["metrics"]["FID-vs-refB"], res["metrics"]["IS"], res["metrics"]["IS_std"]
    print(
        f"\nFID ours {fid:.6f} torch-fidelity {ref['frechet_inception_distance']:.6f}; "
        f"IS ours {is_mean:.6f}+-{is_std:.6f} torch-fidelity {ref['inception_score_mean']:.6f}"
        f"+-{ref['inception_score_std']:.6f}"
    )
    # non-degenerate features and logits (20 images in 10 splits of 2: IS stays small)
    assert fid > 1.0 and is_mean > 1.2
    assert fid == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert is_mean == pytest.approx(ref["inception_score_mean"], rel=1e-3)
    assert is_std == pytest.approx(ref["inception_score_std"], rel=1e-2, abs=1e-4)
    assert res["num_samples"] == N_IMAGES and res["reference"]["num_images"] == N_IMAGES
    assert res["reference"]["content"] == "precomputed statistics (mu, sigma)"
    assert res["inception"]["port"] == "torch-fidelity inception-v3-compat"
    assert res["inception"]["weights"] == str(weights) and len(res["inception"]["weights_sha256"]) == 64
    assert res["meta"] == {"preset": "unit-test"} and res["is_splits"] == 10
    assert json.loads((tmp_path / "refB.json").read_text())["content"] == f"{N_IMAGES} images"


class ShiftTokenizer(torch.nn.Module):
    """RecTok interface stand-in: tokens are 8x8 patches; decoding brightens and blurs the image."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = lambda x: self._tokens(x)
        self.pixel_decoder = self._decode

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        self.hw = x.shape[-2:]
        t = torch.nn.functional.unfold(x, 8, stride=8).transpose(1, 2)
        return torch.cat([t, torch.zeros_like(t)], -1)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        img = torch.nn.functional.fold(z.transpose(1, 2), self.hw, 8, stride=8)
        return torch.nn.functional.avg_pool2d(img, 3, 1, 1, count_include_pad=False) + 0.15

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """As RecTok.reconstruct: the posterior mean decoded to [0, 1]."""
        moments = self._tokens(x)
        return (self._decode(moments[..., : moments.shape[-1] // 2]) * 0.5 + 0.5).clamp(0, 1)


@pytest.mark.slow
def test_rfid_of_reconstructions_agrees_with_torch_fidelity(calibrated, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from rectok.sampling.images import to_uint8

    weights, dir_a, _ = calibrated
    originals = np.load(dir_a.parent / "A.npz")["arr_0"][:8]  # uint8 [8, 64, 64, 3]
    images = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1  # loader convention
    loader = [(images[i : i + 5], torch.zeros(5)) for i in range(0, 8, 5)]
    tok = ShiftTokenizer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", RESIZE)
        net, info = load_inception(weights, (POOL_FEATURES,))
        res = evaluate_reconstruction(
            tok, loader, inception=net, inception_info=info, name="rFID-test", progress=False
        )
        # reference side: the original uint8 pixels; reconstructions floored as the release writes them
        _write_folder(originals, tmp_path / "orig")
        _write_folder(to_uint8(tok.reconstruct(images), "floor").numpy(), tmp_path / "rec")
        ref = _torch_fidelity(weights, tmp_path / "rec", tmp_path / "orig")
    rfid = res["metrics"]["rFID-test"]
    print(f"\nrFID ours {rfid:.6f} torch-fidelity {ref['frechet_inception_distance']:.6f}")
    assert rfid > 0.1
    assert rfid == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert res["rfid_reference"] == "the evaluated input images" and res["uint8_rounding"] == "floor"
