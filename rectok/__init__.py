"""RecTok: Reconstruction Distillation along Rectified Flow."""

__version__ = "0.1.0"
