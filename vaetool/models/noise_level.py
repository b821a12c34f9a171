"""The std of additive white Gaussian noise in images: from a folder's finest wavelet coefficients (the noise
model's sigma when training on noisy images), and from one image's patches (the Wiener step's when denoising).
"""

from __future__ import annotations

import math

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


# Patches of 5 x 5 pixels (75 numbers in colour), at most this many an image (on a grid, so the estimate is the
# same on every run): enough that the noise's eigenvalues average out, few enough to be cheap on large images.
PATCH = 5
MAX_PATCHES = 20_000


def estimate_image_sigma(image: torch.Tensor) -> float:
    """The std of additive white Gaussian noise in one image (C, H, W) in [0, 1], 0-1 scale, from the
    eigenvalues of its patches' covariance (Chen, Zhu & Heng 2015).

    Noise adds sigma^2 to every eigenvalue; the image's structure lives in a few large ones. The smallest
    eigenvalues, taken as the longest tail whose mean is no more than its median (as the eigenvalues of white
    noise alone are), average to sigma^2. Unlike the wavelet median, edges and texture do not count as noise:
    on held-out faces and detail-rich 64x64 images at std 15 it gives 14.9-15.1 where the wavelet median
    gives 16.6, and the Wiener step 0.1-0.23 dB more at std 15 and 25 (BENCHMARKS.md, "The noise level").
    Images with fewer patches than twice a patch's numbers get the wavelet estimate.
    """
    x = image.float()
    channels, height, width = x.shape
    numbers = channels * PATCH * PATCH
    rows, cols = height - PATCH + 1, width - PATCH + 1
    if rows < 1 or cols < 1 or rows * cols < 2 * numbers:
        return estimate_sigma(x[None])
    stride = max(1, math.ceil(math.sqrt(rows * cols / MAX_PATCHES)))
    patches = x.unfold(1, PATCH, stride).unfold(2, PATCH, stride)  # (C, rows', cols', 5, 5)
    samples = patches.permute(1, 2, 0, 3, 4).reshape(-1, numbers)
    samples = samples - samples.mean(0)
    covariance = (samples.T @ samples).double() / (len(samples) - 1)  # centred, so float32 sums suffice
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0)  # largest first
    for start in range(numbers):
        tail = eigenvalues[start:]
        if tail.mean() <= tail.median():
            return float(tail.mean().clamp_min(0.0).sqrt())
    return float(eigenvalues[-1].clamp_min(0.0).sqrt())
