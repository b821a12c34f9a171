"""The `spatial` family: a fully convolutional VAE whose latent is a Gaussian map of C channels at 1/f resolution.

As the autoencoders of latent diffusion (Rombach et al. 2022; diffusers' `AutoencoderKL`): every latent
element has its own diagonal Gaussian posterior and a N(0, I) prior, so the KL is per element and the
model applies to any image whose sides f divides, whole. Unlike latent diffusion's (KL weight 1e-6,
an almost plain autoencoder), the objective is the full ELBO with a calibrated decoder, so the map
keeps only the detail the likelihood pays for, and the unused channels fall back to the prior.

Default f = 4, C = 8 (config.py): a 64x64 image becomes 16x16x8 = 2,048 numbers, six times fewer than
its 12,288 pixel values; f = 4 autoencoders reconstruct far better than f = 8 ones at a small cost in
compression (Rombach et al. 2022, Table 8), and C = 8 leaves the ELBO room to choose how many channels
to use. No attention block in the middle (diffusers has one): on a CPU it would cost more than the
whole encoder at 16x16, and the stages' receptive field already covers most of a small image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import DiagonalGaussian, FactorizedFamily, FactorizedPosterior, Latents, as_latents, register
from .layers import (GroupNorm32, ResidualBlock, encoder_stages, full_precision, groups, output_conv, run_down,
                     run_output, up_stages)


class SpatialEncoder(nn.Module):
    """Conv stages down to 1/f, a residual block, then a conv to each latent element's mean and log-variance."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.patch, width = config.patch, config.widths[-1]
        self.stages = encoder_stages(config)
        self.mid = ResidualBlock(width)
        self.norm = GroupNorm32(groups(width), width)
        self.head = nn.Conv2d(width, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)  # (B, 4C, H/2, W/2)
        h = self.mid(run_down(self.stages, x)[-1])  # (B, W_last, H/f, W/f)
        stats = full_precision(self.head, F.silu(self.norm(h)))  # (B, 2 C_z, H/f, W/f), float32
        mu, logvar = stats.chunk(2, dim=1)
        return DiagonalGaussian(mu, logvar)


class SpatialDecoder(nn.Module):
    """A conv from the latent map to features, a residual block, then nearest + conv stages back to pixels."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.patch, width = config.patch, config.widths[-1]
        self.head = nn.Conv2d(config.latent_channels, width, 3, padding=1)
        self.norm = GroupNorm32(groups(width), width)
        self.mid = ResidualBlock(width)
        self.stages = up_stages(config.widths, blocks=config.blocks, patch=config.patch)
        self.out = output_conv(config.widths[0], config.channels, config.patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(full_precision(self.head, z)))  # (B, W_last, h, w); the latent's conv in float32
        return run_output(self.out, self.stages(self.mid(h)), self.patch)  # (B, C, H, W) logits


@register
class SpatialVAE(FactorizedFamily):
    """A fully convolutional VAE with one latent map `z` (B, C_z, H/f, W/f); images are floats in [0, 1]."""

    kind = "spatial"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.encoder = SpatialEncoder(config)
        self.decoder = SpatialDecoder(config)

    @property
    def size_multiple(self) -> int:
        return self.config.downsample

    def encode(self, x: torch.Tensor) -> FactorizedPosterior:
        self.check_size(*x.shape[-2:])
        return FactorizedPosterior({"z": self.encoder(x * 2.0 - 1.0)})

    def decode(self, latents: Latents | torch.Tensor) -> torch.Tensor:
        z = as_latents(latents, {"z": None})["z"]  # (B, C_z, h, w) -> an image of (f h, f w)
        return self.decoder(z)

    def latent_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        self.check_size(height, width)
        f = self.config.downsample
        return {"z": (self.config.latent_channels, height // f, width // f)}
