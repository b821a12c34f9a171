"""Clean images from posterior samples: the MMSE estimate and plausible clean versions (DivNoising).

For a model trained on noisy images with a noise model, p(s | x) is approximated by decoding
z ~ q(z | x): the mean of the decoded signals over K samples is the MMSE estimate of the clean image
(Prakash, Krull & Jug 2021), and each single decode is one plausible clean version of it. A model trained
with --corrupt (clean targets) gives its estimate the same way: averaging decodes over q(z | noisy x) beats
decoding q's mean, since the decoder is not linear in z. The noise of
every sample is drawn on the CPU from a generator seeded by (seed, image, piece, draw), so the result
is the same whatever the batch, the device or which other images are in the run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..models.base import VAEFamily

# Which estimate a model input asks for: None, the MMSE estimate (or the posterior mean with no samples);
# an int d >= 0, the d-th plausible clean version (one posterior sample).
Draw = int | None
RowKey = tuple[int, int, Draw]  # (image key, piece of the image, draw)


def row_seed(seed: int, key: RowKey) -> int:
    """A 63-bit seed for one model input's noise, stable across processes (unlike `hash`)."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_noise(shapes: dict[str, tuple[int, ...]], keys: Sequence[RowKey], *, count: int, seed: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Level -> (count, B, ...) standard normal noise, row b from its own generator."""
    per_row: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for key in keys:
        generator = torch.Generator().manual_seed(row_seed(seed, key))
        for name, shape in shapes.items():
            per_row[name].append(torch.randn(count, *shape, generator=generator))
    return {name: torch.stack(rows, dim=1).to(device) for name, rows in per_row.items()}


def posterior_mean_images(model: VAEFamily, x: torch.Tensor) -> torch.Tensor:
    """The decode of the posterior means, (B, C, H, W) in [0, 1]: deterministic, one pass."""
    return model.mean_image(model(x, sample=False).logits).float()


def sampled_images(model: VAEFamily, x: torch.Tensor, keys: Sequence[RowKey], *, samples: int,
                   seed: int) -> torch.Tensor:
    """The mean over `samples` posterior samples of the decoded image, (B, C, H, W) in [0, 1].

    One sample is one plausible clean version; many give the MMSE estimate. The decodes run one
    sample at a time, so memory stays that of a single pass whatever `samples` is.
    """
    posterior = model.encode(x)
    shapes = model.latent_shapes(*x.shape[-2:])
    noise = draw_noise(shapes, keys, count=samples, seed=seed, device=x.device)  # level -> (K, B, ...)
    total = None
    for k in range(samples):
        drawn = model.importance_sample(posterior, {name: value[k: k + 1] for name, value in noise.items()})
        images = model.mean_image(drawn.logits).float()  # (B, C, H, W): one sample per image
        total = images if total is None else total + images
    return total / samples


def estimate(model: VAEFamily, x: torch.Tensor, keys: Sequence[RowKey] | None, *, samples: int,
             seed: int) -> torch.Tensor:
    """Each input's asked-for estimate: rows with draw None the MMSE estimate over `samples` (the posterior
    mean when 0), rows with a draw d their d-th single-sample decode."""
    keys = keys if keys is not None else [(0, i, None) for i in range(x.shape[0])]
    if all(draw is None for _, _, draw in keys):
        if samples == 0:
            return posterior_mean_images(model, x)
        return sampled_images(model, x, keys, samples=samples, seed=seed)
    out = torch.empty(x.shape[0], model.config.channels, *x.shape[-2:], device=x.device)
    mean_rows = [i for i, (_, _, draw) in enumerate(keys) if draw is None]
    single_rows = [i for i, (_, _, draw) in enumerate(keys) if draw is not None]
    if mean_rows:
        out[mean_rows] = estimate(model, x[mean_rows], [keys[i] for i in mean_rows], samples=samples, seed=seed)
    out[single_rows] = sampled_images(model, x[single_rows], [keys[i] for i in single_rows], samples=1, seed=seed)
    return out
