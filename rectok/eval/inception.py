"""The FID Inception-v3 (TF-FID port, as torch-fidelity ships it) loaded from a local file only.

The network is torch_fidelity's FeatureExtractorInceptionV3 ("inception-v3-compat"): the
2015-12-05 TensorFlow graph that TTUR/ADM FID and IS use, with TF1-compatible bilinear
resizing to 299 inside the model. Its weights are never downloaded here (no network at run
time): they come from --inception-weights, $RECTOK_INCEPTION_WEIGHTS, or the torch hub
cache where torch-fidelity / pytorch-fid put them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

INCEPTION_PORT = "torch-fidelity inception-v3-compat"
# torch-fidelity's file first (the exact port), then pytorch-fid's conversion of the same graph
# (same layer names; both are converted from TF's inception-2015-12-05).
WEIGHT_FILENAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
WEIGHTS_ENV = "RECTOK_INCEPTION_WEIGHTS"
POOL_FEATURES = "2048"  # pool3, FID
LOGITS_FEATURES = "logits_unbiased"  # pool3 @ W without bias: the IS logits of the TF graph


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local FID Inception weights file; FileNotFoundError naming the file and where to put it."""
    if path is not None:
        candidates = [Path(path)]
    elif os.environ.get(WEIGHTS_ENV):
        candidates = [Path(os.environ[WEIGHTS_ENV])]
    else:
        candidates = [_hub_checkpoints() / name for name in WEIGHT_FILENAMES]
    looked = []
    for cand in candidates:
        options = [cand / name for name in WEIGHT_FILENAMES] if cand.is_dir() else [cand]
        for opt in options:
            if opt.is_file():
                return opt
            looked.append(str(opt))
    raise FileNotFoundError(
        f"FID Inception-v3 weights not found (looked at: {', '.join(looked)}). Nothing is downloaded at "
        f"run time: on a machine with internet fetch {WEIGHT_FILENAMES[1]} (pytorch-fid release "
        f"'fid_weights') or {WEIGHT_FILENAMES[0]} (torch-fidelity release v0.2.0), then pass "
        f"--inception-weights PATH, set {WEIGHTS_ENV}=PATH, or copy it into {_hub_checkpoints()}/"
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_inception(
    state_dict: dict[str, torch.Tensor],
    features: tuple[str, ...] = (POOL_FEATURES, LOGITS_FEATURES),
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """torch-fidelity's Inception filled from `state_dict`, in eval mode on `device`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity reads its weights with weights_only=False; handing it a buffer that we
    # serialised from an already weights_only-checked state dict keeps untrusted pickles out.
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    buf.seek(0)
    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", list(features), feature_extractor_weights_path=buf
        )
    except RuntimeError as err:  # load_state_dict key / shape mismatch
        raise ValueError(f"not FID Inception-v3 weights (torch-fidelity layout expected): {err}") from err
    return net.to(device).eval()


def load_inception(
    weights: str | os.PathLike | None = None,
    features: tuple[str, ...] = (POOL_FEATURES, LOGITS_FEATURES),
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict]:
    """(network, info) where info records the port, weights path and sha256 for result files."""
    path = resolve_inception_weights(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused unpickling or a corrupt file
        raise ValueError(f"{path} is not a loadable state dict (read with weights_only=True): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    net = build_inception(state, features, device)
    info = {"port": INCEPTION_PORT, "weights": str(path), "weights_sha256": file_sha256(path)}
    return net, info


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Disable TF32 for convolutions and matmuls (on by default for cuDNN convs) so features are
    computed in IEEE fp32 like the reference implementations on CPU."""
    cudnn_conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # the torch >= 2.9 API
    saved = (cudnn_conv.fp32_precision, matmul.fp32_precision)
    cudnn_conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        cudnn_conv.fp32_precision, matmul.fp32_precision = saved


@torch.no_grad()
def extract_features(
    net: torch.nn.Module,
    batches: Iterable[np.ndarray | torch.Tensor],
    total: int | None = None,
    desc: str = "inception",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run uint8 image batches [B, H, W, 3] through `net` -> {feature name: float32 [N, D]}."""
    device = next(net.parameters()).device
    names = list(net.features_list)
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    with full_fp32(), tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            x = torch.as_tensor(batch)
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"expected uint8 images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
            x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W), what the port expects
            for name, feat in zip(names, net(x)):
                out[name].append(feat.float().cpu().numpy())
            bar.update(x.shape[0])
    if not out[names[0]]:
        raise ValueError("no images to extract features from")
    return {k: np.concatenate(v) for k, v in out.items()}
