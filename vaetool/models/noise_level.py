"""The std of additive white Gaussian noise in images, from their finest wavelet coefficients: the noise model's
sigma when training on noisy images, and the Wiener step's when denoising."""

from __future__ import annotations

import torch

# MAD of a standard normal: median |N(0, 1)| = 0.6745, so sigma = median |w| / 0.6745 (Donoho & Johnstone 1994).
MAD_TO_SIGMA = 0.6745


def haar_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The finest orthonormal Haar diagonal (HH) coefficients of images (..., H, W) -> (..., H//2, W//2).

    Orthonormal, so white noise of std sigma gives coefficients of std sigma, and smooth signal almost none.
    """
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2.0


def estimate_sigma(images: torch.Tensor) -> float:
    """The std of additive white Gaussian noise in images (N, C, H, W), uint8 or float in [0, 1], 0-1 scale.

    As scikit-image's `estimate_sigma`: the median absolute finest diagonal wavelet coefficient / 0.6745,
    per image and channel; the median over them is robust to the few images with much fine texture.
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    coefficients = haar_diagonal(x).flatten(2)  # (N, C, h w)
    per_channel = coefficients.abs().median(dim=-1).values / MAD_TO_SIGMA  # (N, C)
    return float(per_channel.mean(dim=1).median())
