"""A small teacher with real semantics for the FSD study: Teacher.tiny's ViT, trained here.

No DINO weights exist offline, and a random teacher's features carry no semantics, so FSD would
distil nothing. The study therefore trains the exact architecture `--tok.teacher tiny` builds (a
DINOv3-style timm ViT: 64 wide, 2 blocks, 2 heads, 4 register tokens, RoPE; patch 16, so one
feature per tokenizer token) with supervised cross-entropy: a linear head on the mean-pooled patch
features after the final norm, which are exactly the features the tokenizer's semantic decoder is
asked to predict. Inputs go through the teacher's own `preprocess` (the same target path as in
training), and under "release" targets each step draws DINOv3's train-mode RoPE rescale (the
tokenizer stage runs the teacher in train mode, and DINOv3 itself was trained with it), so the
features stay meaningful under it.

The backbone is saved as safetensors in timm's layout, which `Teacher.tiny(FILE)` and
`--tok.teacher tiny --tok.teacher_weights FILE` load strictly; the file is reloaded through that
path before it is scored, so the reported accuracy belongs to the weights the tokenizers see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from rectok.eval.probe import ProbeConfig, fit_linear_probe
from rectok.models.teacher import Teacher, draw_rope_rescale


def load_split(root: Path, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of root/split as ([N, 3, S, S] in [-1, 1] float32, labels [N])."""
    from rectok.eval.image_io import LabelledImageFolder

    data = LabelledImageFolder(root / split, image_size)
    x = torch.stack([data[i][0] for i in range(len(data))])
    return x, torch.tensor(data.labels)


def _pooled(teacher: Teacher, inputs: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Mean over patch tokens of the teacher's final-norm features [B, D] of preprocessed `inputs`
    [B, 3, F, F], with autograd."""
    if teacher.rope_rescale is not None:
        teacher.model.rope.factor = draw_rope_rescale(teacher.rope_rescale) if rescale else None
    tokens = teacher.model.forward_features(inputs)  # (B, prefix + L, D)
    return tokens[:, teacher.num_prefix_tokens :].mean(1)


@torch.no_grad()
def _preprocessed(teacher: Teacher, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """teacher.preprocess of every image, once: it is deterministic, and its 224 px round trip costs
    4x the tiny ViT's own forward and backward on a CPU."""
    return torch.cat([teacher.preprocess(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def pooled_features(teacher: Teacher, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """The frozen teacher's mean-pooled features of x [N, 3, S, S] -> [N, D] (eval mode)."""
    teacher.eval()
    return torch.cat([teacher(x[i : i + batch]).mean(1) for i in range(0, len(x), batch)])


def fresh_teacher(seed: int, image_size: int, targets: str) -> Teacher:
    """Teacher.tiny's random initialisation under `seed` (the starting point, and the test's baseline)."""
    torch.manual_seed(seed)
    return Teacher.tiny("random", image_size=image_size, targets=targets)


def train_teacher(
    root: Path,
    out_dir: Path,
    *,
    steps: int,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    image_size: int = 64,
    targets: str = "release",
    layer_scale: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train, save (out_dir/teacher.safetensors + teacher_head.safetensors), reload and score."""
    started = time.perf_counter()
    x_tr, y_tr = load_split(root, "train", image_size)
    x_va, y_va = load_split(root, "val", image_size)
    num_classes = int(y_tr.max()) + 1
    teacher = fresh_teacher(seed, image_size, targets)
    init = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    net = teacher.model.requires_grad_(True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".gamma_" in name:  # layer scale: timm's 1e-5 would keep a few-hundred-step ViT linear
                p.fill_(layer_scale)
    head = nn.Linear(teacher.feature_dim, num_classes)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    inputs = _preprocessed(teacher, x_tr)  # (N, 3, F, F)
    g = torch.Generator().manual_seed(seed)
    order, pos, every = torch.randperm(len(x_tr), generator=g), 0, max(1, steps // 5)
    for step in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x_tr), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        x = inputs[idx]
        # Every class is mirror-symmetric as a class; the resizes of preprocess commute with a flip.
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(head(_pooled(teacher, x, rescale=True)), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            elapsed = time.perf_counter() - started
            log(f"  teacher step {step}/{steps} | loss {loss.item():.3f} | {elapsed:.0f}s")
    if teacher.rope_rescale is not None:
        teacher.model.rope.factor = None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "teacher.safetensors"
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"what": "rectok.study tiny teacher (supervised on the shapes set)"})
    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()},
        str(out_dir / "teacher_head.safetensors"),
    )

    loaded = Teacher.tiny(path, image_size=image_size, targets=targets)  # what train.py will load
    f_tr, f_va = pooled_features(loaded, x_tr), pooled_features(loaded, x_va)
    with torch.no_grad():
        head_acc = (head(f_va).argmax(1) == y_va).float().mean().item()
        train_acc = (head(f_tr).argmax(1) == y_tr).float().mean().item()
    probe = fit_linear_probe(f_tr, y_tr, num_classes, ProbeConfig())
    probe_acc = (probe.predict(f_va) == y_va).float().mean().item()
    moved = sum((state[k].float() - init[k].float()).square().sum().item() for k in state) ** 0.5
    size = sum(v.square().sum().item() for v in init.values()) ** 0.5
    return {
        "weights": str(path),
        "architecture": "timm vit_small_patch16_dinov3 at width 64, 2 blocks, 2 heads, 4 registers, patch 16",
        "parameters": sum(v.numel() for v in state.values()),
        "training": dict(
            steps=steps, batch=batch, lr=lr, seed=seed, targets=targets, objective="supervised CE"
        ),
        "val_accuracy_head": head_acc,
        "train_accuracy_head": train_acc,
        "val_accuracy_linear_probe": probe_acc,
        "weights_moved_l2": moved,
        "init_weights_l2": size,
        "num_classes": num_classes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
