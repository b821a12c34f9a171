"""Decoder likelihoods p(x|z): Gaussian and Laplace with a calibrated shared scale (sigma-VAE), Bernoulli, and the
noise model of a VAE trained on noisy images alone (DivNoising): N(x; s(z), sigma^2) with sigma known."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig

LOG_2PI = math.log(2 * math.pi)


def _identity(value: torch.Tensor) -> torch.Tensor:
    return value


class Likelihood:
    """The decoder's distribution, mixed into a model family (an `nn.Module`); holds the shared log scale.

    `reduce_mean` averages a statistic over training processes; the trainer sets it under DDP, so the
    model itself never talks to other processes.
    """

    def __init__(self, config: ModelConfig) -> None:
        # The decoder's shared log scale: learned (sigma-VAE), tracked optimum, or fixed; a noise model's is its sigma.
        initial = torch.tensor(math.log(config.fixed_scale) if config.decoder_scale == "fixed" else 0.0)
        if config.noise_model != "none":
            # Fixed, as DivNoising (Prakash et al. 2021) fixes its noise model before training: a free scale
            # could shrink and let the decoder explain the noise as signal.
            initial = torch.tensor(math.log(max(config.noise_sigma, math.exp(config.min_log_scale))))
            self.register_buffer("log_scale", initial)
        elif config.likelihood != "bernoulli" and config.decoder_scale == "learned":
            self.log_scale = nn.Parameter(initial)
        else:
            self.register_buffer("log_scale", initial)
        self.register_buffer("scale_updates", torch.zeros(()))  # batches seen by the running optimum
        self.reduce_mean = _identity

    @staticmethod
    def mean_image(logits: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image in [0, 1] (the Bernoulli mean, or the Gaussian/Laplace location)."""
        return torch.sigmoid(logits.float())

    def log_scale_for(self, residual: torch.Tensor) -> torch.Tensor:
        """The decoder's log scale; in 'optimal' mode, the batch's maximum-likelihood value while training."""
        cfg = self.config
        if cfg.decoder_scale == "optimal" and self.training and cfg.noise_model == "none":
            # sigma^2 = MSE (Gaussian) or b = MAE (Laplace) maximise the likelihood (Rybkin et al. 2021).
            # It is held constant in the gradient: at the optimum d(loss)/d(sigma) = 0, so the gradient is
            # the same (envelope theorem), and a value averaged over all processes keeps DDP exact.
            with torch.no_grad():
                error = residual.pow(2) if cfg.likelihood == "gaussian" else residual.abs()
                stat = self.reduce_mean(error.mean())
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
