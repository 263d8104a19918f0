"""Teacher weights in any layout users have, offline -> (timm model name, create kwargs, timm state dict).

Layouts read (DINOv3 into timm's Eva, DINOv2 into timm's VisionTransformer):
- timm (the `timm/...` hub repos), DINOv3 with or without the q/v-bias tensors of the `_qkvb` variants;
- Meta's original checkpoints (DINOv3 `storage_tokens` / `qkv.bias` / `ls1.gamma`; DINOv2 `mask_token`
  and a 518 px `pos_embed`), also inside an official `{"model_state_dict": ...}` wrapper;
- HF transformers (`AutoModel.from_pretrained` folders: config.json + model.safetensors):
  DINOv3ViTModel (facebook/dinov3-*) and Dinov2Model (facebook/dinov2-*). The key conversion is ours
  (transformers is not a dependency); it maps HF names onto Meta's layout and timm's own
  `checkpoint_filter_fn` does the rest, so Meta and HF files share one tested path into timm.

Files are read with safetensors, or torch.load(weights_only=True): never by unpickling code. A folder
may be a save_pretrained / snapshot folder or an HF cache repo folder (models--org--name). With no
path, the HF hub cache is searched for the timm repo and then the HF transformers repo, offline.

The DINOv3 q/v-bias rule: timm's plain DINOv3 models have no q/v bias parameters and its filter
drops biases it cannot place (printing a line per block), which moves the features ~20% when the
biases are non-zero. So the biases are inspected before any model is built: non-zero ones select the
`_qkvb` variant when the teacher was named by alias ("dinov3"), and are an error when a plain variant
was named explicitly. All-zero biases (the released distilled ViT-L) use the plain, faster variant.

The checkpoint is checked against the requested model, never adopted: the teacher's width drives
the semantic decoder, so a ViT-B file under "dinov3" (ViT-L) must fail rather than shrink it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import SwiGLU
from timm.models import split_model_name_tag
from torch import nn

log = logging.getLogger(__name__)

TEACHERS = {
    "dinov3": "vit_large_patch16_dinov3.lvd1689m",
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
}
# Files a weights folder or hub repo may hold, in the order tried (HF transformers and timm repos
# both use these, and timm prefers them in this order).
WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def resolve_model_name(name: str) -> str:
    """'dinov3' / 'dinov2' -> the timm model name; any other timm name passes through."""
    return TEACHERS.get(name, name)


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(hf_home) / "hub"


def find_cached_weights(model_name: str, cache_dir: str | Path | None = None) -> Path | None:
    """A weights file for `model_name` already on disk (HF hub cache, then torch hub), or None.

    Only looks at local files: never contacts the hub.
    """
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return None
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if cfg.hf_hub_id:
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILENAMES
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:  # timm's URL download lands in the torch hub checkpoint folder
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
    return None


def missing_weights_message(model_name: str, cache_dir: Path) -> str:
    hub_id = f"timm/{model_name}"
    return (
        f"no weights for the teacher {model_name} were found offline (looked in the HF hub cache "
        f"{cache_dir} for {hub_id}, and in {Path(torch.hub.get_dir()) / 'checkpoints'}); "
        "RecTok never downloads at run time.\n"
        f"To get them, on a machine with internet access (DINOv3 is gated: accept its licence on "
        f"https://huggingface.co/{hub_id} and run `huggingface-cli login` first):\n"
        f"  huggingface-cli download {hub_id} model.safetensors --local-dir weights/{model_name}\n"
        f"then copy the file here and pass `--tok.teacher_weights weights/{model_name}/model.safetensors` "
        "(Meta's original .pth checkpoint works too), or copy the whole HF cache folder to this machine.\n"
        f"If DINOv3 access is pending, DINOv2 ViT-L/14 is not gated: `--tok.teacher dinov2` "
        f"with the weights of timm/{TEACHERS['dinov2']} (the paper finds DINOv2 the better teacher "
        "at 16 latent channels, DINOv3 at 128). "
        "For a smoke test without semantics, `--tok.teacher_weights random`."
    )


# Training-checkpoint wrappers unwrapped on the way in ("model_state_dict": the official release).
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "module")
# Prefixes left by DDP and torch.compile when a whole wrapped module was saved.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")

# HF transformers repos holding the same weights as a timm model (single-file ones only).
HF_REPOS = {
    "vit_small_patch16_dinov3.lvd1689m": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "vit_small_plus_patch16_dinov3.lvd1689m": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "vit_base_patch16_dinov3.lvd1689m": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "vit_large_patch16_dinov3.lvd1689m": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "vit_large_patch16_dinov3.sat493m": "facebook/dinov3-vitl16-pretrain-sat493m",
    "vit_huge_plus_patch16_dinov3.lvd1689m": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
    "vit_small_patch14_dinov2.lvd142m": "facebook/dinov2-small",
    "vit_base_patch14_dinov2.lvd142m": "facebook/dinov2-base",
    "vit_large_patch14_dinov2.lvd142m": "facebook/dinov2-large",
    "vit_giant_patch14_dinov2.lvd142m": "facebook/dinov2-giant",
}
DEFAULT_TAGS = {"dinov3": "lvd1689m", "dinov2": "lvd142m"}

LAYOUTS = {
    "hf-dinov3": ("dinov3", "DINOv3, HF transformers layout"),
    "meta-dinov3": ("dinov3", "DINOv3, Meta's original layout"),
    "timm-dinov3": ("dinov3", "DINOv3, timm layout"),
    "hf-dinov2": ("dinov2", "DINOv2, HF transformers layout"),
    "meta-dinov2": ("dinov2", "DINOv2, Meta's original layout"),
    "timm-dinov2": ("dinov2", "DINOv2, timm layout"),
}
SUPPORTED = (
    "supported: DINOv3 and DINOv2 in timm's layout (timm/... hub repos), Meta's original checkpoints "
    "(also wrapped in {'model_state_dict': ...}), or HF transformers folders (config.json + "
    "model.safetensors of facebook/dinov3-* or facebook/dinov2-*), as .safetensors, .pth, .pt or .bin"
)


@dataclass(frozen=True)
class TeacherWeights:
    """A teacher checkpoint ready for timm: build `model_name` with `create_kwargs` (pretrained=False),
    then `load_state_dict(state_dict, strict=True)`."""

    model_name: str  # may differ from the request: the `_qkvb` variant when the biases are non-zero
    create_kwargs: dict[str, Any]  # the caller's kwargs, passed through (checkpoints add none)
    state_dict: dict[str, torch.Tensor]  # timm layout for exactly that model, pos_embed at its grid
    path: Path  # the weights file read
    layout: str  # e.g. "DINOv3, HF transformers layout"


def resolve_teacher_weights(
    weights: str | os.PathLike | None,
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    auto_qkv_bias: bool | None = None,
    **create_kwargs: Any,
) -> TeacherWeights:
    """Locate, read and convert teacher weights for `name` ("dinov3", "dinov2" or a timm name).

    weights: a weights file, a folder holding one (HF / timm repo folder, HF cache repo folder), or
    None for the HF hub cache (`cache_dir`, default: huggingface_hub's), never the network.
    auto_qkv_bias: pick the DINOv3 plain / `_qkvb` variant from the checkpoint's q/v biases; None
    means "when `name` is an alias". create_kwargs: timm.create_model arguments (img_size,
    num_classes, embed_dim, ...); the state dict is fitted to that model (DINOv2 position embeddings
    resampled to its grid exactly as timm does).
    Raises FileNotFoundError (nothing there, with where to put it) or ValueError (unreadable file,
    unknown layout, or weights of another model).
    """
    path = Path(weights) if weights is not None else find_teacher_weights(name, cache_dir)
    file, config_file = _locate(path)
    state = read_state_dict(file)
    config = None
    # Only HF transformers weights are described by their config.json (a timm repo's has other keys).
    if config_file is not None and detect_layout(state) in ("hf-dinov3", "hf-dinov2"):
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file} (beside the weights) is not valid JSON: {err}") from err
    final_name, timm_state, layout = convert_state_dict(
        state,
        name,
        config=config,
        source=str(file),
        auto_qkv_bias=auto_qkv_bias,
        **create_kwargs,
    )
    log.info("teacher %s: %s read from %s", final_name, layout, file)
    return TeacherWeights(final_name, dict(create_kwargs), timm_state, file, layout)


def load_teacher_model(
    weights: str | os.PathLike | None,
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    auto_qkv_bias: bool | None = None,
    **create_kwargs: Any,
) -> tuple[nn.Module, str]:
    """resolve_teacher_weights, then build the timm model and load it strictly: (model in eval mode,
    path of the weights file read)."""
    resolved = resolve_teacher_weights(
        weights, name, cache_dir=cache_dir, auto_qkv_bias=auto_qkv_bias, **create_kwargs
    )
    model = timm.create_model(resolved.model_name, pretrained=False, **resolved.create_kwargs)
    model.load_state_dict(resolved.state_dict, strict=True)
    return model.eval(), str(resolved.path)


# ---------------------------------------------------------------- finding and reading files


def find_teacher_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The weights of teacher `name` (alias or timm name) already in the HF hub cache: the timm repo
    (plain or `_qkvb`), else the HF transformers repo's snapshot folder. Only local files are read;
    FileNotFoundError saying how to get them."""
    model_name = resolve_model_name(name)
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    for variant in dict.fromkeys([model_name, _variant_name(model_name, qkvb=True)]):
        if variant is not None and (found := find_cached_weights(variant, cache)) is not None:
            return found
    repo = hf_repo_id(model_name)
    if repo is not None:
        from huggingface_hub import try_to_load_from_cache

        found = [
            try_to_load_from_cache(repo, f, cache_dir=cache) for f in ("config.json", WEIGHT_FILENAMES[0])
        ]
        if all(isinstance(f, str) and os.path.isfile(f) for f in found):
            return Path(found[1]).parent
    message = missing_weights_message(model_name, cache)
    if repo is not None:
        local = f"weights/{repo.split('/')[1]}"
        message += (
            f"\nAlso looked there for the HF transformers repo {repo}; its files work as well:\n"
            f"  huggingface-cli download {repo} config.json model.safetensors --local-dir {local}\n"
            f"then pass `--tok.teacher_weights {local}`."
        )
    raise FileNotFoundError(message)


def hf_repo_id(model_name: str) -> str | None:
    """The HF transformers repo with the weights of a timm DINOv2/DINOv3 model name, if there is one."""
    base, tag = split_model_name_tag(model_name)
    base = base.removesuffix("_qkvb")
    family = "dinov3" if base.endswith("dinov3") else "dinov2" if base.endswith("dinov2") else None
    if family is None:
        return None
    return HF_REPOS.get(f"{base}.{tag or DEFAULT_TAGS[family]}")


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, its HF config.json or None) for a file or folder the user pointed at."""
    if not path.exists():
        raise FileNotFoundError(
            f"teacher weights not found: {path} (pass a .safetensors / .pth / .bin file, a folder holding "
            "model.safetensors (+ config.json for HF transformers weights), 'random', or nothing to use "
            "the HF hub cache)"
        )
    if path.is_dir():
        folder = _hf_cache_snapshot(path) if path.name.startswith("models--") else path
        file = next((folder / f for f in WEIGHT_FILENAMES if (folder / f).is_file()), None)
        if file is None:
            raise FileNotFoundError(
                f"{folder} holds none of {', '.join(WEIGHT_FILENAMES)}: point --tok.teacher_weights at the "
                f"weights file itself, or at the folder `save_pretrained` / `huggingface-cli download` made"
            )
    else:
        file = path
    config = file.parent / "config.json"
    return file, config if config.is_file() else None


def _hf_cache_snapshot(repo_dir: Path) -> Path:
    """The snapshot folder of an HF cache repo folder (models--org--name), as huggingface_hub finds it."""
    from huggingface_hub import try_to_load_from_cache

    repo_id = repo_dir.name[len("models--") :].replace("--", "/", 1)
    for filename in WEIGHT_FILENAMES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=repo_dir.parent)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found).parent
    # A copy without refs/ (huggingface_hub then cannot tell the revision): accept a single snapshot.
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    if len(snapshots) == 1:
        return snapshots[0]
    raise FileNotFoundError(
        f"{repo_dir} looks like an HF cache repo folder, but no snapshot of it holds "
        f"{' or '.join(WEIGHT_FILENAMES)} (found {len(snapshots)} snapshots); copy the complete folder, "
        "refs/ included, or point at snapshots/<revision>/"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read safely: safetensors, or torch.load(weights_only=True) for
    .pth / .pt / .bin; training-checkpoint wrappers and DDP / compile prefixes removed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable .safetensors file: {err}") from err
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's message is long; its WeightsUnpickler line says what was refused.
            found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", str(err), re.S)
            reason = found.group(1).strip() if found else str(err).splitlines()[0]
            if (refused := re.search(r"Unsupported global: GLOBAL \S+", reason)) is not None:
                reason = refused.group(0)
                raise ValueError(
                    f"{path} holds more than tensors and plain containers ({reason}), so it is not read: "
                    "only torch.load(weights_only=True) is used, which never runs code from the file. "
                    "Re-save just the weights: torch.save(model.state_dict(), path), or a .safetensors file"
                ) from err
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {reason}") from err
        except (RuntimeError, EOFError, OSError) as err:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    else:
        raise ValueError(f"{path}: unknown teacher weights type {suffix!r}; {SUPPORTED}")
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ValueError(
                f"{path} is not a state dict of tensors (top-level keys: {sorted(map(str, obj))[:8]}), nor "
                f"one wrapped under {', '.join(WRAPPER_KEYS)}; {SUPPORTED}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} holds {type(obj).__name__}, not a state dict of tensors; {SUPPORTED}")
    state = dict(obj)
    for prefix in STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------- converting


def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which of LAYOUTS a state dict is in, from its key names; None if none."""
    if "embeddings.patch_embeddings.weight" in state:
        return "hf-dinov3"
    if "embeddings.patch_embeddings.projection.weight" in state:
        return "hf-dinov2"
    if "storage_tokens" in state:
        return "meta-dinov3"
    if "patch_embed.proj.weight" in state:
        if "pos_embed" in state:
            return "meta-dinov2" if "mask_token" in state else "timm-dinov2"
        if "blocks.0.gamma_1" in state:
            return "timm-dinov3"
    return None


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    name: str,
    *,
    config: Mapping[str, Any] | None = None,
    source: str = "the state dict",
    auto_qkv_bias: bool | None = None,
    **create_kwargs: Any,
) -> tuple[str, dict[str, torch.Tensor], str]:
    """A state dict in any of LAYOUTS -> (timm model name to build, its timm state dict, layout).

    config: the HF config (config.json's contents, or DINOv3ViTConfig / Dinov2Config keyword
    arguments), checked against the model when given. Works on meta tensors except
    for the q/v biases, whose values decide the variant. See resolve_teacher_weights for the rest.
    """
    model_name = resolve_model_name(name)
    layout = detect_layout(state)
    if layout is None:
        raise ValueError(
            f"{source} is not a DINOv2/DINOv3 checkpoint in a known layout (keys: {sorted(state)[:6]} ...); "
            f"{SUPPORTED}"
        )
    family, description = LAYOUTS[layout]
    model = _meta_model(model_name, create_kwargs)
    model_family = {"timm.models.eva": "dinov3", "timm.models.vision_transformer": "dinov2"}.get(
        type(model).__module__
    )
    if model_family != family:
        raise ValueError(
            f"{source} holds {description} weights, but the teacher {model_name} is not a "
            f"{description.split(',')[0]} model: pass --tok.teacher {family} (or a matching timm name)"
        )
    if layout == "hf-dinov3":
        if config is not None:
            _check_hf_config(config, "dinov3_vit", _hf_dinov3_arch(config), _model_arch(model), source)
        state = _hf_dinov3_to_meta(state, source)
        description += " (config checked)" if config is not None else " (no config: shapes checked only)"
    elif layout == "hf-dinov2":
        if config is not None:
            _check_hf_config(config, "dinov2", _hf_dinov2_arch(config), _model_arch(model), source)
        state = _hf_dinov2_to_meta(state, source)
        description += " (config checked)" if config is not None else " (no config: shapes checked only)"
    state = dict(state)
    _check_patch_size(state, model, model_name, source)

    if family == "dinov3":
        model_name, model, state = _choose_qkv_bias_variant(
            state, model_name, model, name, auto_qkv_bias, create_kwargs, source
        )
    # timm's own conversion (Meta layouts, pos_embed resampling to the model's grid, bicubic + antialias).
    filter_fn = importlib.import_module(type(model).__module__).checkpoint_filter_fn
    out = filter_fn(state, model)
    expected = model.state_dict()
    for key, ref in expected.items():  # a `_qkvb` model loading a bias-free file: its biases are zero
        if key.endswith(("attn.q_bias", "attn.v_bias")) and key not in out:
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype, device=out["patch_embed.proj.weight"].device)
    _check_keys(out, expected, model_name, f"{source} ({description})")
    return model_name, out, description


def _meta_model(model_name: str, create_kwargs: Mapping[str, Any]) -> nn.Module:
    # Shapes and module types only: building on the meta device costs no memory and no init time.
    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False, **create_kwargs)


def _variant_name(model_name: str, qkvb: bool) -> str | None:
    """The plain / `_qkvb` twin of a timm DINOv3 name (pretrained tag kept where it exists), or None."""
    base, tag = split_model_name_tag(model_name)
    new = base.removesuffix("_qkvb") + ("_qkvb" if qkvb else "")
    if not timm.is_model(new):
        return None
    return f"{new}.{tag}" if tag and f"{new}.{tag}" in timm.list_pretrained(f"{new}.{tag}") else new


def qv_bias_max(state: Mapping[str, torch.Tensor]) -> float | None:
    """Largest |query or value bias| in a DINOv3 state dict (Meta / timm layout); None if it has none.

    Meta's fused qkv.bias is [q | k | v]: its k third is masked to zero at run time (bias_mask), so
    its values do not count, as in timm's conversion.
    """
    parts = []
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            parts += [q, v]
        elif key.endswith(("attn.q_bias", "attn.v_bias")):
            parts.append(value)
    return max(float(p.abs().max()) for p in parts) if parts else None


def _choose_qkv_bias_variant(
    state: dict[str, torch.Tensor],
    model_name: str,
    model: nn.Module,
    requested: str,
    auto: bool | None,
    create_kwargs: Mapping[str, Any],
    source: str,
) -> tuple[str, nn.Module, dict[str, torch.Tensor]]:
    """(model name, meta model, state) with the DINOv3 q/v biases placed, never silently dropped."""
    auto = requested in TEACHERS if auto is None else auto
    bias_max = qv_bias_max(state)
    nonzero = bias_max is not None and bias_max > 0
    has_bias = getattr(model.blocks[0].attn, "q_bias", None) is not None
    want = nonzero if auto else has_bias
    if nonzero and not want:
        twin = _variant_name(model_name, qkvb=True)
        raise ValueError(
            f"{source} has non-zero query/value biases (max |b| = {bias_max:.3g}), but the teacher "
            f"{model_name} has no q/v bias parameters: loading would drop them and change the features. "
            + (f"Use {twin}, or an alias such as 'dinov3' to pick it automatically." if twin else "")
        )
    if want != has_bias:
        twin = _variant_name(model_name, qkvb=want)
        if twin is None:
            if want:
                raise ValueError(
                    f"{source} has non-zero query/value biases (max |b| = {bias_max:.3g}), but timm has no "
                    f"q/v-bias variant of {model_name} to hold them"
                )
        else:
            model_name, model = twin, _meta_model(twin, create_kwargs)
    if getattr(model.blocks[0].attn, "q_bias", None) is None:
        # All zero (checked above): drop them so timm's filter does not report each block it skips.
        state = {
            k: v for k, v in state.items() if not k.endswith(("attn.qkv.bias", "attn.q_bias", "attn.v_bias"))
        }
    return model_name, model, state


def _hf_dinov3_to_meta(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF DINOv3ViTModel names -> Meta's original names (then timm's eva filter applies).

    HF splits Meta's fused qkv into q/k/v_proj; its gated MLP is gate/up/down = Meta's w1/w2/w3.
    """
    gated = "layer.0.mlp.gate_proj.weight" in state
    mlp = (
        {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        if gated
        else {"up_proj": "fc1", "down_proj": "fc2"}
    )
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "storage_tokens",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"layer\.(\d+)\.(.+)", key)
        if m is None:
            out[top.get(key, key)] = value  # unknown keys keep their name: the final check reports them
            continue
        i, rest = int(m.group(1)), m.group(2)
        if (a := re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)) is not None:
            qkv.setdefault(i, {})[f"{a.group(1)}.{a.group(2)}"] = value
            continue
        rest = re.sub(r"^attention\.o_proj\.", "attn.proj.", rest)
        rest = re.sub(r"^layer_scale([12])\.lambda1$", r"ls\1.gamma", rest)
        if (b := re.fullmatch(r"mlp\.(\w+)\.(weight|bias)", rest)) is not None and b.group(1) in mlp:
            rest = f"mlp.{mlp[b.group(1)]}.{b.group(2)}"
        out[f"blocks.{i}.{rest}"] = value
    for i, parts in qkv.items():
        if missing := [f"layer.{i}.attention.{p}_proj.weight" for p in "qkv" if f"{p}.weight" not in parts]:
            raise ValueError(f"{source} is an incomplete HF DINOv3 checkpoint: no {', '.join(missing)}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts[f"{p}.weight"] for p in "qkv"])
        if any(f"{p}.bias" in parts for p in "qkv"):
            k_bias = parts.get("k.bias")
            if k_bias is not None and not k_bias.is_meta and bool(k_bias.any()):
                raise ValueError(
                    f"{source} has a non-zero key bias (layer {i}); DINOv3 (Meta, timm) has none, so these "
                    "weights cannot be loaded faithfully"
                )
            like = next(parts[f"{p}.bias"] for p in "qkv" if f"{p}.bias" in parts)
            zeros = torch.zeros_like(like)  # a bias HF leaves out (key_bias=False) is zero
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts.get(f"{p}.bias", zeros) for p in "qkv"])
    return out


def _hf_dinov2_to_meta(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF Dinov2Model names -> Meta's original names (then timm's vision_transformer filter applies)."""
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    renames = (
        (r"^attention\.output\.dense\.", "attn.proj."),
        (r"^layer_scale([12])\.lambda1$", r"ls\1.gamma"),
        (r"^mlp\.weights_in\.", "mlp.w12."),  # SwiGLU (giant; no fixture): HF's packed fc = Meta's w12
        (r"^mlp\.weights_out\.", "mlp.w3."),
    )
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if m is None:
            out[top.get(key, key)] = value
            continue
        i, rest = m.group(1), m.group(2)
        if (a := re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)) is not None:
            qkv.setdefault(f"blocks.{i}.attn.qkv.{a.group(2)}", {})[a.group(1)] = value
            continue
        for pattern, new in renames:
            rest = re.sub(pattern, new, rest)
        out[f"blocks.{i}.{rest}"] = value
    for key, parts in qkv.items():
        if missing := [p for p in ("query", "key", "value") if p not in parts]:
            raise ValueError(
                f"{source} is an incomplete HF DINOv2 checkpoint: {key} lacks {', '.join(missing)}"
            )
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


# ---------------------------------------------------------------- checks


def _model_arch(model: nn.Module) -> dict[str, Any]:
    """The architecture fields an HF config.json describes, read off a (meta) timm model."""
    block = model.blocks[0]
    mlp = block.mlp
    gated = isinstance(mlp, SwiGLU)
    act = mlp.act
    act_name = {"GELU": "gelu" if getattr(act, "approximate", "none") == "none" else "gelu_tanh"}.get(
        type(act).__name__, type(act).__name__.lower()
    )
    reg = getattr(model, "reg_token", None)
    rope = getattr(model, "rope", None)
    return {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": (mlp.fc1_g if gated else mlp.fc1).out_features,
        "use_gated_mlp": gated,
        "hidden_act": act_name,
        "patch_size": model.patch_embed.patch_size[0],
        "num_channels": model.patch_embed.proj.in_channels,
        "num_register_tokens": reg.shape[1] if reg is not None else 0,
        "rope_theta": getattr(rope, "temperature", None),
        "layer_norm_eps": model.norm.eps,
    }


def _hf_dinov3_arch(config: Mapping[str, Any]) -> dict[str, Any]:
    # Defaults as in transformers' DINOv3ViTConfig, for keys a config.json may leave out.
    get = lambda key, default: config.get(key, default)  # noqa: E731
    return {
        "hidden_size": get("hidden_size", 384),
        "num_hidden_layers": get("num_hidden_layers", 12),
        "num_attention_heads": get("num_attention_heads", 6),
        "intermediate_size": get("intermediate_size", 1536),
        "use_gated_mlp": get("use_gated_mlp", False),
        "hidden_act": get("hidden_act", "gelu"),
        "patch_size": get("patch_size", 16),
        "num_channels": get("num_channels", 3),
        "num_register_tokens": get("num_register_tokens", 0),
        "rope_theta": float(get("rope_theta", 100.0)),
        "layer_norm_eps": float(get("layer_norm_eps", 1e-5)),
    }


def _hf_dinov2_arch(config: Mapping[str, Any]) -> dict[str, Any]:
    # Defaults as in transformers' Dinov2Config. Its SwiGLU hidden size follows Meta's 2/3 rule,
    # which timm's SwiGLUPacked also applies, so only the plain MLP width is compared.
    get = lambda key, default: config.get(key, default)  # noqa: E731
    hidden, gated = get("hidden_size", 768), get("use_swiglu_ffn", False)
    arch = {
        "hidden_size": hidden,
        "num_hidden_layers": get("num_hidden_layers", 12),
        "num_attention_heads": get("num_attention_heads", 12),
        "hidden_act": "silu" if gated else get("hidden_act", "gelu"),
        "patch_size": get("patch_size", 14),
        "num_channels": get("num_channels", 3),
        "layer_norm_eps": float(get("layer_norm_eps", 1e-6)),
    }
    if not gated:
        arch["intermediate_size"] = int(hidden * get("mlp_ratio", 4))
    return arch


def _check_hf_config(
    config: Mapping[str, Any], model_type: str, theirs: dict[str, Any], ours: dict[str, Any], source: str
) -> None:
    if config.get("model_type", model_type) != model_type:  # an in-memory config may leave it out
        raise ValueError(
            f"the config.json beside {source} is for model_type {config.get('model_type')!r}, expected "
            f"{model_type!r}; {SUPPORTED}"
        )
    diff = [f"{k}={v!r} (teacher: {ours[k]!r})" for k, v in theirs.items() if k in ours and ours[k] != v]
    if diff:
        raise ValueError(
            f"{source} does not hold weights of this teacher: its config.json says {', '.join(diff)}. "
            "Pick the teacher that matches the file (--tok.teacher), or the file that matches the teacher"
        )


def _check_patch_size(
    state: Mapping[str, torch.Tensor], model: nn.Module, model_name: str, source: str
) -> None:
    # timm's filters would resample a patch embedding of another size, silently changing the teacher.
    got = tuple(state["patch_embed.proj.weight"].shape[-2:])
    want = tuple(model.patch_embed.proj.weight.shape[-2:])
    if got != want:
        raise ValueError(
            f"{source} does not hold weights of {model_name}: its patch size is {got}, not {want}"
        )


def _check_keys(
    out: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model_name: str, source: str
) -> None:
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    shapes = [
        f"{k}: file {list(out[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(out) & set(expected))
        if out[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if problems:
        raise ValueError(f"{source} does not hold weights of {model_name}: {'; '.join(problems)}")
