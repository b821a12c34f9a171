"""The noise of images a model learns from alone: a noise model's sigma, or the sigma a recorrupted denoiser's
training assumes, given or estimated from the images."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..config import Corruption, ModelConfig, TrainConfig
from ..events import Callback, Note, Warning, ignore
from ..models.noise_level import estimate_image_sigma, estimate_sigma

# Below this std (0-1 scale; 2 on the 0-255 one) the finest wavelet band holds little more than the 8-bit
# quantisation and the images' own fine texture: the images look clean.
CLEAN_SIGMA = 2.0 / 255.0
ESTIMATE_IMAGES = 512  # images the estimate reads, spread over the set: enough for a stable median


def fit_noise_model(config: ModelConfig, images: torch.Tensor, *, emit: Callback = ignore) -> ModelConfig:
    """The config with its noise sigma estimated from the training images when none was given.

    Reports the sigma used (`Note`), and a `Warning` when the estimate says the images are clean.
    """
    if config.noise_model == "none":
        return config
    sigma = _fit_sigma(images, given=config.noise_sigma, estimate=estimate_sigma,
                       what=f"noise model {config.noise_model}, sigma",
                       clean="a model trained with --noise-model on them only reconstructs", emit=emit)
    return dataclasses.replace(config, noise_sigma=sigma)


def fit_recorruption(config: TrainConfig, images: torch.Tensor, *, emit: Callback = ignore) -> TrainConfig:
    """The config with the sigma of its recorruption estimated from the training images when none was given.

    Recorrupted training is unbiased only at the images' true sigma (a sigma too high leaves the target's
    noise correlated with the input's), so the estimate is the median of each image's patch estimate
    (`estimate_image_sigma`), which fine texture does not inflate as it does the wavelet median's.
    """
    recorrupt = config.recorrupt
    if recorrupt is None:
        return config

    def median_of_patch_estimates(chosen: torch.Tensor) -> float:
        return float(torch.tensor([estimate_image_sigma(image.float() / 255.0) for image in chosen]).median())

    sigma = _fit_sigma(images, given=recorrupt.low, estimate=median_of_patch_estimates,
                       what="recorrupted training at noise sigma",
                       clean="--recorrupt learns to denoise the noise the images have", emit=emit)
    return dataclasses.replace(config, corruptions=(Corruption("recorrupt", sigma, sigma),))


def _fit_sigma(images: torch.Tensor, *, given: float, estimate: Callable[[torch.Tensor], float], what: str,
               clean: str, emit: Callback) -> float:
    """`given` when above 0, else `estimate` of up to ESTIMATE_IMAGES images spread over the set (uint8),
    floored; a Note says which, a Warning (naming `clean`, what such images give) when they look clean."""
    if given > 0:
        emit(Note(f"{what} {given:.4g} ({255 * given:.3g} on the 0-255 scale), as given"))
        return given
    chosen = images[::max(1, len(images) // ESTIMATE_IMAGES)][:ESTIMATE_IMAGES]
    sigma = estimate(chosen)
    if sigma < CLEAN_SIGMA:
        emit(Warning(f"the images look clean (estimated noise sigma {255 * sigma:.2f} on the 0-255 scale): {clean}; "
                     f"give gaussian:SIGMA if the noise is known, or train with --corrupt on clean images"))
    sigma = max(sigma, 1.0 / 255.0)  # a floor: a near-zero sigma makes the likelihood explode
    emit(Note(f"{what} {sigma:.4g} ({255 * sigma:.3g} on the 0-255 scale), estimated from {len(chosen)} images"))
    return sigma
