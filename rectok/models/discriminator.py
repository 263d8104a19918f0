"""PatchGAN discriminator of the tokenizer's adversarial loss (SPEC section 4).

The taming-transformers / pix2pix `NLayerDiscriminator` as the RecTok release uses it:
4x4 convolutions, `n_layers` stride-2 stages (the first without normalisation), one
stride-1 stage, BatchNorm, LeakyReLU(0.2), and a 1-channel map of patch logits. The
release keeps PyTorch's default initialisation (it does not apply taming's
`weights_init`), and so do we.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> patch logits [B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2]."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"PatchDiscriminator needs n_layers >= 1 and ndf >= 1, got {n_layers}, {ndf}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):  # stride-2 stages, channels doubling up to 8 * ndf
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
