"""The `vector` family: the classic convolutional VAE with one vector latent z ~ N(0, I)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import DiagonalGaussian, FactorizedPosterior, Latents, ModelOutput, VAEFamily, as_latents, register
from .layers import full_precision, icnr_, stage, upsample_conv


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
        stages, in_ch = [], config.channels * config.patch**2
        for index, width in enumerate(config.widths):
            stride = 1 if (index == 0 and config.patch == 2) else 2
            stages.append(stage(nn.Conv2d(in_ch, width, 3, stride=stride, padding=1), width, config.blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch * config.bottom_size**2, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)  # (B, 4C, H/2, W/2)
        # The first conv runs in float32; unpacking the stage keeps the checkpoint's parameter names.
        first, *rest = self.stages[0]
        h = full_precision(first, x)
        for layer in rest:
            h = layer(h)
        h = self.stages[1:](h)  # (B, W_last, s, s)
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
        targets = list(reversed(widths[:-1])) + ([] if config.patch == 2 else [widths[0]])
        stages, in_ch = [], widths[-1]
        for width in targets:
            stages.append(stage(upsample_conv(in_ch, width), width, config.blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(in_ch, config.channels * config.patch**2, 3, padding=1)
        if config.patch > 1:
            icnr_(self.out, config.patch**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(full_precision(self.head, z)).view(-1, *self.shape)  # (B, W_last, s, s)
        out = full_precision(self.out, self.stages(h))  # (B, C * patch^2, H/patch, W/patch), float32
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out  # (B, C, H, W) logits


@register
class VAE(VAEFamily):
    """A convolutional VAE with a vector latent `z` (B, D); images are float tensors in [0, 1]."""

    kind = "vector"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> FactorizedPosterior:
        return FactorizedPosterior({"z": self.encoder(x * 2.0 - 1.0)})

    def decode(self, latents: Latents | torch.Tensor) -> torch.Tensor:
        return self.decoder(as_latents(latents, {"z": None})["z"])

    def forward(self, x: torch.Tensor, *, sample: bool = True, noise: Latents | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        posterior = self.encode(x)
        latents = posterior.sample(generator, noise=noise) if sample else posterior.mode()
        return ModelOutput(latents, self.decode(latents), posterior.kl_terms(), posterior)

    def latent_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {"z": (self.config.latent_dim,)}

    def sample_prior(self, count: int, *, temperature: float | dict[str, float] = 1.0,
                     generator: torch.Generator | None = None, size: tuple[int, int] | None = None) -> Latents:
        t = temperature.get("z", 1.0) if isinstance(temperature, dict) else temperature
        return {"z": t * torch.randn(count, self.config.latent_dim, generator=generator)}


VectorVAE = VAE
