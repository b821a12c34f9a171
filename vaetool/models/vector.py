"""The `vector` family: the classic convolutional VAE with one vector latent z ~ N(0, I)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import DiagonalGaussian, FactorizedFamily, FactorizedPosterior, Latents, as_latents, register
from .layers import encoder_stages, full_precision, output_conv, run_down, run_output, up_stages


class Encoder(nn.Module):
    """Conv stages that halve the resolution, then a linear map to the posterior's mean and log-variance.

    With `patch = 2` the image is first folded into 2x2 pixel patches (pixel unshuffle), so the first
    stage runs at half resolution on 4x the channels instead of a stride-2 conv over 3 channels:
    the same receptive field and downsampling for a fraction of the time, because convolutions with
    3 input channels use a CPU's vector units poorly.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.patch = config.patch
        self.stages = encoder_stages(config)
        self.head = nn.Linear(config.widths[-1] * config.bottom_size**2, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)  # (B, 4C, H/2, W/2)
        h = run_down(self.stages, x)[-1]  # (B, W_last, s, s)
        mu, logvar = full_precision(self.head, h.flatten(1)).chunk(2, dim=1)  # (B, D) each, float32
        return DiagonalGaussian(mu, logvar)


class Decoder(nn.Module):
    """Mirror of the encoder; nearest upsampling + conv avoids checkerboard artefacts (Odena et al. 2016).

    With `patch = 2` the last conv predicts 2x2 pixel patches that a pixel shuffle unfolds; it starts
    as nearest upsampling (ICNR initialisation, Aitken et al. 2017), so no checkerboard either.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths, self.patch = config.widths, config.patch
        self.shape = (widths[-1], config.bottom_size, config.bottom_size)
        self.head = nn.Linear(config.latent_dim, widths[-1] * config.bottom_size**2)
        self.stages = up_stages(widths, blocks=config.blocks, patch=config.patch)
        self.out = output_conv(widths[0], config.channels, config.patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(full_precision(self.head, z)).view(-1, *self.shape)  # (B, W_last, s, s)
        return run_output(self.out, self.stages(h), self.patch)  # (B, C, H, W) logits, float32


@register
class VAE(FactorizedFamily):
    """A convolutional VAE with a vector latent `z` (B, D); images are float tensors in [0, 1]."""

    kind = "vector"
    vector_level = "z"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> FactorizedPosterior:
        return FactorizedPosterior({"z": self.encoder(x * 2.0 - 1.0)})

    def decode(self, latents: Latents | torch.Tensor) -> torch.Tensor:
        return self.decoder(as_latents(latents, {"z": None})["z"])

    def latent_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {"z": (self.config.latent_dim,)}


VectorVAE = VAE
