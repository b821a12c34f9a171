"""The convolutional VAE: encoder, decoder, diagonal Gaussian posterior, likelihoods and the ELBO loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32 and bf16
LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian:
    """q(z|x) = N(mu, diag(exp(logvar))): the encoder's output distribution."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu = mu  # (B, D)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)  # (B, D)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw z = mu + std * eps (the reparameterization trick, Kingma & Welling 2014)."""
        if noise is None:
            noise = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + self.std * noise.to(self.mu.dtype)

    def mode(self) -> torch.Tensor:
        return self.mu

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension, (B, D), in closed form."""
        return 0.5 * (self.mu.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over dimensions, (B,) nats."""
        return self.kl_per_dim().sum(dim=1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z of shape (..., B, D), summed over D."""
        return -0.5 * (((z - self.mu) ** 2) / self.logvar.exp() + self.logvar + LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-process statistic over all DDP processes (itself in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def _full_precision(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in float32 even under bf16/fp16 autocast.

    Used for the layers that touch pixels or the latent (the first and last convolution, the two
    linear heads): measured on CPU, a bf16 first convolution alone made a 400-step run end 2,000 nats
    worse, while these four layers cost a few percent of the step.
    """
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def _groups(width: int) -> int:
    return math.gcd(width, 8)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 under autocast; the output keeps the input's dtype.

    On CPU, bf16 GroupNorm was the slow part of a bf16 step (23% of it, mostly the backward pass):
    in float32 the same step ran 1.15x faster. The parameters and checkpoint names are GroupNorm's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(x))): extra depth at constant resolution."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = GroupNorm32(_groups(width), width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(self.norm(x)))


def _stage(conv: nn.Module, width: int, blocks: int) -> nn.Sequential:
    layers = [conv, GroupNorm32(_groups(width), width), nn.SiLU()]
    layers += [ResidualBlock(width) for _ in range(blocks)]
    return nn.Sequential(*layers)


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
            stages.append(_stage(nn.Conv2d(in_ch, width, 3, stride=stride, padding=1), width, config.blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch * config.bottom_size**2, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)  # (B, 4C, H/2, W/2)
        first, *rest = self.stages[0]
        h = _full_precision(first, x)
        for layer in rest:
            h = layer(h)
        h = self.stages[1:](h)  # (B, W_last, s, s)
        mu, logvar = _full_precision(self.head, h.flatten(1)).chunk(2, dim=1)  # (B, D) each, float32
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
            conv = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, width, 3, padding=1))
            stages.append(_stage(conv, width, config.blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(in_ch, config.channels * config.patch**2, 3, padding=1)
        if config.patch > 1:
            _icnr_(self.out, config.patch**2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(_full_precision(self.head, z)).view(-1, *self.shape)  # (B, W_last, s, s)
        out = _full_precision(self.out, self.stages(h))  # (B, C * patch^2, H/patch, W/patch), float32
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out  # (B, C, H, W) logits


@torch.no_grad()
def _icnr_(conv: nn.Conv2d, group: int) -> None:
    """Give the `group` sub-pixel outputs of each channel the same filter: a pixel shuffle then starts as nearest upsampling."""
    weight = conv.weight.view(-1, group, *conv.weight.shape[1:])  # (C, group, in, k, k)
    weight.copy_(weight[:, :1].expand_as(weight))
    bias = conv.bias.view(-1, group)
    bias.copy_(bias[:, :1].expand_as(bias))


@dataclass
class VAEOutput:
    posterior: DiagonalGaussian
    z: torch.Tensor  # (B, D)
    logits: torch.Tensor  # (B, C, H, W)


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: what the optimiser minimises (mean over the batch)
    recon: torch.Tensor  # (B,) -log p(x|z), nats per image
    kl: torch.Tensor  # (B,) KL(q(z|x) || p(z)), nats per image

    @property
    def neg_elbo(self) -> torch.Tensor:
        """(B,) the negative ELBO per image, whatever beta or free bits the loss used."""
        return self.recon + self.kl


class VAE(nn.Module):
    """A convolutional VAE with a vector latent; images are float tensors in [0, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # The decoder's shared log scale: learned (sigma-VAE), tracked optimum, or fixed.
        initial = torch.tensor(math.log(config.fixed_scale) if config.decoder_scale == "fixed" else 0.0)
        if config.likelihood != "bernoulli" and config.decoder_scale == "learned":
            self.log_scale = nn.Parameter(initial)
        else:
            self.register_buffer("log_scale", initial)
        self.register_buffer("scale_updates", torch.zeros(()))  # batches seen by the running optimum

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for images x (B, C, H, W) in [0, 1]."""
        return self.encoder(x * 2.0 - 1.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder logits (B, C, H, W) for latents z (B, D); `mean_image` turns them into pixels."""
        return self.decoder(z)

    @staticmethod
    def mean_image(logits: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image in [0, 1] (the Bernoulli mean, or the Gaussian/Laplace location)."""
        return torch.sigmoid(logits.float())

    def forward(self, x: torch.Tensor, *, sample: bool = True, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> VAEOutput:
        posterior = self.encode(x)
        z = posterior.sample(generator, noise=noise) if sample else posterior.mode()
        return VAEOutput(posterior, z, self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean, (B, C, H, W) in [0, 1]."""
        return self.mean_image(self.decode(self.encode(x).mode()))

    def log_scale_for(self, residual: torch.Tensor) -> torch.Tensor:
        """The decoder's log scale; in 'optimal' mode, the batch's maximum-likelihood value while training."""
        cfg = self.config
        if cfg.decoder_scale == "optimal" and self.training:
            # sigma^2 = MSE (Gaussian) or b = MAE (Laplace) maximise the likelihood (Rybkin et al. 2021).
            # It is held constant in the gradient: at the optimum d(loss)/d(sigma) = 0, so the gradient is
            # the same (envelope theorem), and a value averaged over all processes keeps DDP exact.
            with torch.no_grad():
                error = residual.pow(2) if cfg.likelihood == "gaussian" else residual.abs()
                stat = global_mean(error.mean())
                stat = stat.sqrt() if cfg.likelihood == "gaussian" else stat
            log_scale = stat.clamp_min(1e-12).log()
            with torch.no_grad():  # running value used at evaluation time; the first batch sets it outright
                weight = torch.clamp(1.0 / (self.scale_updates + 1.0), min=0.05)
                self.log_scale.lerp_(log_scale.detach().to(self.log_scale.dtype), weight)
                self.scale_updates += 1
            return log_scale.clamp_min(cfg.min_log_scale)
        return self.log_scale.clamp_min(cfg.min_log_scale)

    def log_likelihood(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels, (B,) nats; x (B, C, H, W) in [0, 1]."""
        logits = logits.float()
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        residual = x - torch.sigmoid(logits)
        log_scale = self.log_scale_for(residual)
        if self.config.likelihood == "gaussian":
            per_pixel = -0.5 * (residual * torch.exp(-log_scale)).pow(2) - log_scale - 0.5 * LOG_2PI
        else:  # Laplace: -|r| / b - log(2b)
            per_pixel = -residual.abs() * torch.exp(-log_scale) - log_scale - math.log(2.0)
        return per_pixel.flatten(1).sum(1)


def elbo_loss(model: VAE, target: torch.Tensor, output: VAEOutput, *, beta: float = 1.0,
              free_bits: float = 0.0) -> LossTerms:
    """Negative ELBO per image, summed over pixels and latent dims, averaged over the batch.

    Summing per image (not averaging over pixels) keeps the balance between reconstruction and KL
    that the ELBO defines (Kingma & Welling 2014); averaging silently multiplies the KL weight by
    the pixel count. `free_bits` (nats per dimension, Kingma et al. 2016) stops the optimiser from
    pushing a dimension's batch-averaged KL below that floor.
    """
    recon = -model.log_likelihood(target, output.logits)  # (B,)
    kl_per_dim = output.posterior.kl_per_dim()  # (B, D)
    kl = kl_per_dim.sum(1)  # (B,)
    if free_bits > 0:
        # Which dimensions sit below the floor is decided on the global batch, so DDP stays exact.
        active = global_mean(kl_per_dim.detach().mean(0)) > free_bits  # (D,)
        kl_term = torch.where(active, kl_per_dim.mean(0), torch.full_like(active, free_bits, dtype=kl.dtype)).sum()
    else:
        kl_term = kl.mean()
    loss = recon.mean() + beta * kl_term if beta > 0 else recon.mean()
    return LossTerms(loss, recon.detach(), kl.detach())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
