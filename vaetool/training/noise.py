"""The noise of images a model learns from alone: a noise model's sigma, or the sigma a recorrupted denoiser's
training assumes, given or estimated from the images."""

from __future__ import annotations

import dataclasses

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


def fit_recorruption(config: TrainConfig, images: torch.Tensor, *, emit: Callback = ignore) -> TrainConfig:
    """The config with the sigma of its recorruption estimated from the training images when none was given.

    Recorrupted training is unbiased only at the images' true sigma (a sigma too high leaves the target's
    noise correlated with the input's), so the estimate is the median of each image's patch estimate
    (`estimate_image_sigma`), which fine texture does not inflate as it does the wavelet median's.
    """
    recorrupt = config.recorrupt
    if recorrupt is None:
        return config
    if recorrupt.low > 0:
        emit(Note(f"recorrupted training at noise sigma {recorrupt.low:.4g} ({255 * recorrupt.low:.3g} on the "
                  f"0-255 scale), as given"))
        return config
    step = max(1, len(images) // ESTIMATE_IMAGES)
    chosen = images[::step][:ESTIMATE_IMAGES]
    sigma = float(torch.tensor([estimate_image_sigma(image.float() / 255.0) for image in chosen]).median())
    if sigma < CLEAN_SIGMA:
        emit(Warning(f"the images look clean (estimated noise sigma {255 * sigma:.2f} on the 0-255 scale): "
                     f"--recorrupt learns to denoise the noise the images have; give gaussian:SIGMA if it is known, "
                     f"or train with --corrupt on clean images"))
    sigma = min(max(sigma, 1.0 / 255.0), 0.5)
    emit(Note(f"recorrupted training at noise sigma {sigma:.4g} ({255 * sigma:.3g} on the 0-255 scale), "
              f"estimated from {len(chosen)} images"))
    return dataclasses.replace(config, corruptions=(Corruption("recorrupt", sigma, sigma),))
