"""The noise model of a VAE trained on noisy images alone: its sigma, given or estimated from the images."""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..events import Callback, Note, Warning, ignore

# MAD of a standard normal: median |N(0, 1)| = 0.6745, so sigma = median |w| / 0.6745 (Donoho & Johnstone 1994).
MAD_TO_SIGMA = 0.6745
# Below this std (0-1 scale; 2 on the 0-255 one) the finest wavelet band holds little more than the 8-bit
# quantisation and the images' own fine texture: the images look clean.
CLEAN_SIGMA = 2.0 / 255.0
ESTIMATE_IMAGES = 512  # images the estimate reads, spread over the set: enough for a stable median


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


def fit_noise_model(config: ModelConfig, images: torch.Tensor, *, emit: Callback = ignore) -> ModelConfig:
    """The config with its noise sigma estimated from the training images when none was given.

    Reports the sigma used (`Note`), and a `Warning` when the estimate says the images are clean.
    """
    if config.noise_model == "none":
        return config
    if config.noise_sigma > 0:
        emit(Note(f"noise model {config.noise_model}, sigma {config.noise_sigma:.4g} "
                  f"({255 * config.noise_sigma:.3g} on the 0-255 scale), as given"))
        return config
    step = max(1, len(images) // ESTIMATE_IMAGES)
    sigma = estimate_sigma(images[::step][:ESTIMATE_IMAGES])
    if sigma < CLEAN_SIGMA:
        emit(Warning(f"the images look clean (estimated noise sigma {255 * sigma:.2f} on the 0-255 scale): a model "
                     f"trained with --noise-model on them only reconstructs; give gaussian:SIGMA if the noise is known, "
                     f"or train with --corrupt on clean images"))
    sigma = max(sigma, 1.0 / 255.0)  # a floor: a near-zero sigma makes the likelihood explode
    emit(Note(f"noise model {config.noise_model}, sigma {sigma:.4g} ({255 * sigma:.3g} on the 0-255 scale), "
              f"estimated from {len(images[::step][:ESTIMATE_IMAGES])} images"))
    return dataclasses.replace(config, noise_sigma=sigma)
