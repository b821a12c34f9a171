"""Per-batch input corruption for denoising training, and reproducible per-step noise.

A denoising autoencoder (Vincent et al. 2008) sees a corrupted image and is scored on the clean one.
All noise for a step is drawn for the *global* batch from a generator seeded by (seed, step) and then
sliced, so the same sample gets the same noise however the batch is split across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import RECORRUPT_ALPHA, Corruption, recorruption


def step_generator(seed: int, step: int, device: torch.device, *, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resumable and shard-independent."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return generator


def global_randn(shape: Sequence[int], *, generator: torch.Generator, rows: slice, device: torch.device) -> torch.Tensor:
    """Draw N(0, 1) for the whole global batch (first dim) and keep this process's rows."""
    return torch.randn(tuple(shape), generator=generator, device=device)[rows]


def global_rand(shape: Sequence[int], *, generator: torch.Generator, rows: slice, device: torch.device) -> torch.Tensor:
    """Draw U(0, 1) for the whole global batch and keep this process's rows."""
    return torch.rand(tuple(shape), generator=generator, device=device)[rows]


def corrupt(x: torch.Tensor, corruptions: Sequence[Corruption], *, generator: torch.Generator,
            global_batch: int, rows: slice) -> torch.Tensor:
    """Apply each corruption in order to x (B, C, H, W) in [0, 1]; the result stays in [0, 1]."""
    if not corruptions:
        return x
    device = x.device
    _, channels, height, width = x.shape
    pixel_shape = (global_batch, 1, height, width)  # one decision per pixel, shared by channels
    for item in corruptions:
        amount = item.low + (item.high - item.low) * global_rand(
            (global_batch, 1, 1, 1), generator=generator, rows=rows, device=device)  # (B, 1, 1, 1)
        if item.kind == "gaussian":
            noise = global_randn((global_batch, channels, height, width), generator=generator, rows=rows, device=device)
            x = (x + amount * noise).clamp(0.0, 1.0)
        elif item.kind == "mask":
            drop = global_rand(pixel_shape, generator=generator, rows=rows, device=device) < amount
            x = x.masked_fill(drop, 0.0)
        elif item.kind == "saltpepper":  # a fraction of pixels set to black or white
            hit = global_rand(pixel_shape, generator=generator, rows=rows, device=device) < amount
            white = global_rand(pixel_shape, generator=generator, rows=rows, device=device) < 0.5
            x = torch.where(hit, white.to(x.dtype), x)
        else:  # recorrupt changes the target too: training_pair
            raise ValueError(f"{item.kind} is not an input corruption; use training_pair")
    return x


def training_pair(x: torch.Tensor, corruptions: Sequence[Corruption], *, generator: torch.Generator,
                  global_batch: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """A denoiser's input and the image it is scored against, for training images x (B, C, H, W) in [0, 1].

    Clean images: x corrupted (`corrupt`), and x. Noisy images of noise std sigma (`recorrupt`, Pang et al.
    2021): x + alpha sigma z, and x - sigma z / alpha, whose noises are independent, so that the expected error
    against the target is the error against the clean image plus a constant. The target is not clamped
    (clamping would bias it); the input is, as every image the model sees.
    """
    recorrupt = recorruption(corruptions)
    if recorrupt is None:
        return corrupt(x, corruptions, generator=generator, global_batch=global_batch, rows=rows), x
    _, channels, height, width = x.shape
    z = global_randn((global_batch, channels, height, width), generator=generator, rows=rows, device=x.device)
    sigma, alpha = recorrupt.low, RECORRUPT_ALPHA
    return (x + alpha * sigma * z).clamp(0.0, 1.0), x - (sigma / alpha) * z


def target_noise_variance(corruptions: Sequence[Corruption]) -> float:
    """The noise variance per pixel of the training target: sigma^2 (1 + 1 / alpha^2) for recorrupted noisy
    images (their own noise and the recorruption's), else 0. Taken off a mean squared error against the
    target, it leaves an estimate of the error against the clean image."""
    recorrupt = recorruption(corruptions)
    return 0.0 if recorrupt is None else recorrupt.low ** 2 * (1 + 1 / RECORRUPT_ALPHA ** 2)


def add_gaussian_noise(x: torch.Tensor, sigma: float, *, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, sigma^2), clamped to [0, 1]: the usual test corruption."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(0.0, 1.0)
