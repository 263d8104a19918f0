"""Fused ops of RecTok (installed as `rectok.kernels`).

Each op has a Triton forward/backward, a pure-PyTorch reference in the same file,
a `torch.library` registration (so `torch.compile(fullgraph=True)` keeps it whole)
and the functional API below, which is all that model code calls.
"""

from .attention import rope_attention, rope_attention_reference
from .backend import BACKENDS, current_backend, use_backend
from .cosine_loss import cosine_distill_loss, cosine_distill_loss_reference
from .flow import flow_interpolate, flow_interpolate_reference, velocity_mse, velocity_mse_reference
from .rms_norm import rms_norm, rms_norm_modulate, rms_norm_modulate_reference, rms_norm_reference
from .rope import apply_rope, apply_rope_reference, rope_qkv, rope_qkv_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "BACKENDS",
    "apply_rope",
    "apply_rope_reference",
    "cosine_distill_loss",
    "cosine_distill_loss_reference",
    "current_backend",
    "flow_interpolate",
    "flow_interpolate_reference",
    "rms_norm",
    "rms_norm_modulate",
    "rms_norm_modulate_reference",
    "rms_norm_reference",
    "rope_attention",
    "rope_attention_reference",
    "rope_qkv",
    "rope_qkv_reference",
    "swiglu",
    "swiglu_reference",
    "use_backend",
    "velocity_mse",
    "velocity_mse_reference",
]
