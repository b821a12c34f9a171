"""Image-quality and latent-usage measures: bits/dim, PSNR, SSIM, active units (pure functions on tensors)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015: a unit is active when Cov_x(E_q[z_d]) > 0.01
LN2, LN256 = math.log(2.0), math.log(256.0)
BPD_CONVENTION = {
    "continuous": "8-bit data, uniform dequantization: x in [0, 1] is rescaled to [0, 256), so "
                  "bits/dim = (-log p(x) + D ln 256) / (D ln 2), the density taken at x = k/255",
    "bernoulli": "binary data: bits/dim = -log p(x) / (D ln 2), no dequantization term",
}


def bits_per_dim(nll_nats: float | torch.Tensor, dims: int, likelihood: str) -> float | torch.Tensor:
    """Convert -log p(x) in nats per image to bits per dimension.

    Continuous likelihoods (Gaussian, Laplace) give a density on [0, 1]^D; with uniform
    dequantization of 8-bit data, x = (k + u) / 256, the density on [0, 256)^D is p / 256^D, so
    -log P(k) <= -log p_[0,1](x) + D ln 256 (Theis et al. 2016). Bernoulli is already a probability.
    """
    offset = 0.0 if likelihood == "bernoulli" else dims * LN256
    return (nll_nats + offset) / (dims * LN2)


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, (B,) dB, for (B, C, H, W) images; capped at 100 dB."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10 * data_range**2))


def _gaussian_window(size: int, sigma: float, *, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    weights = torch.exp(-coords.pow(2) / (2.0 * sigma**2))
    return weights / weights.sum()  # (size,)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, (B,), averaged over channels and window positions.

    Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5), weighted (not Bessel-corrected)
    moments, valid positions only. Images smaller than the window use the largest odd window that fits.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    n, c, h, w = a.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian_window(size, sigma, device=a.device)
    x, y = a.double().reshape(n * c, 1, h, w), b.double().reshape(n * c, 1, h, w)
    stack = torch.cat([x, y, x * x, y * y, x * y])  # (5 N C, 1, H, W)
    # Separable Gaussian: rows then columns. float64, because var = E[x^2] - mu^2 cancels.
    moments = F.conv2d(F.conv2d(stack, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)  # (N C, 1, H', W') each
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, c, -1).mean(dim=(1, 2))  # (B,)


def active_units(mus: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Latent units whose posterior mean varies over the data: Var_x(E_q[z_d]) > threshold (Burda et al. 2015)."""
    return int((mus.double().var(dim=0, unbiased=False) > threshold).sum())


class Moments:
    """Streaming per-dimension mean and variance in float64 (Chan et al. 1979), for active units."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, values: torch.Tensor) -> None:
        """Fold in a batch of rows (B, D)."""
        values = values.detach().double().cpu()  # (B, D)
        n, mean = values.shape[0], values.mean(0)
        m2 = (values - mean).pow(2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta.pow(2) * self.count * n / total
        self.count = total

    def variance(self) -> torch.Tensor:
        """Per-dimension population variance (D,) of the rows so far."""
        return self.m2 / max(self.count, 1)
