"""The Wiener step of denoising: the model's clean estimate as the pilot of an empirical Wiener filter.

BM3D's second stage (Dabov et al. 2007) with the model in place of its first: in every 8x8 block of the noisy
image (overlapping, a few pixels apart), each DCT coefficient is kept in the proportion P^2 / (P^2 + sigma^2),
P the pilot's coefficient there, and the blocks are averaged with weights 1 / (sigma^2 sum gains^2). Where the
pilot has signal, the noisy image's own detail comes back (a model's decode loses fine detail the noise does
not hide); where it has none, the noise goes. Two such passes, each taking the one before as its pilot, then
the collaborative pass of `blockmatch.py`, which filters each block together with the blocks most like it
(`--no-block-matching` leaves it out: the step 10 times faster). Last, the output is blended with the pilot
by Stein's unbiased risk estimate, so a pilot already better than the filter's output stays. Colour images
are filtered in an orthonormal opponent colour space, so the noise keeps its sigma there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..models.noise_level import estimate_sigma
from .blockmatch import collaborative_pass
from .transforms import BLOCK, OPPONENT, dct_basis

# Output rows filtered at once: bounds the blocks held (64 numbers each per pixel / stride^2) to a few
# hundred MiB for images thousands of pixels wide.
BAND_ROWS = 128
# The passes' block strides. The second pass takes the first's output as its pilot, which holds the detail the
# model's decode lost: on held-out faces and detail-rich images at noise std 5-25, +0.2 to +4 dB over one pass,
# about the same at 50; more passes let noise back in at high noise. Strides 4 then 3 cost a third of two
# passes at stride 2 for 0.1-0.2 dB less (BENCHMARKS.md, "The Wiener step").
STRIDES = (4, 3)


def _coefficients(image: torch.Tensor, stride: int) -> torch.Tensor:
    """The DCT coefficients (C, rows, cols, 64) of the image's (C, h, w) blocks, at the stride."""
    blocks = image.unfold(1, BLOCK, stride).unfold(2, BLOCK, stride)  # (C, rows, cols, 8, 8), a view
    return blocks.reshape(*blocks.shape[:3], BLOCK * BLOCK) @ dct_basis(BLOCK).T


def _filter_band(noisy_coefficients: torch.Tensor, pilot: torch.Tensor, sigma: float, stride: int,
                 size: tuple[int, int], with_diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over a band of `size` (h, w): the weighted sums of the filtered blocks, their weights, and (if asked,
    else zeros) the weighted sums of the filter's diagonal (how much of each noisy pixel stays in it)."""
    energy = _coefficients(pilot, stride).square_()
    gain = energy.div_(energy + sigma * sigma)  # (C, rows, cols, 64)
    channels, rows, cols, blocks = gain.shape
    weight = 1.0 / (sigma * sigma * gain.square().sum(-1, keepdim=True)).clamp_min(1e-12)  # (C, rows, cols, 1)
    basis = dct_basis(BLOCK)
    diagonal = (gain @ basis.square()).mul_(weight) if with_diagonal else None  # sum_k gain_k basis_kq^2
    filtered = (gain.mul_(noisy_coefficients) @ basis).mul_(weight)  # back to pixels, weighted

    def fold(per_block: torch.Tensor) -> torch.Tensor:  # (C, rows, cols, 64) -> overlapping sums (C, h, w)
        flat = per_block.reshape(channels, rows * cols, -1).transpose(1, 2).reshape(1, -1, rows * cols)
        return F.fold(flat, output_size=size, kernel_size=BLOCK, stride=stride)[0]

    weights = fold(weight.expand(-1, -1, -1, blocks))
    return fold(filtered), weights, torch.zeros_like(weights) if diagonal is None else fold(diagonal)


def _wiener_pass(noisy: torch.Tensor, pilot: torch.Tensor, sigma: float, stride: int,
                 cache: dict[tuple[int, int], torch.Tensor],
                 with_diagonal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One Wiener pass on padded images (C, h, w) in the filter's colour space, in bands of rows: the
    estimate, and the diagonal of the linear map from the noisy image to it (the pilot's gains held fixed;
    zeros unless `with_diagonal`).

    `cache` keeps a band's noisy coefficients for the next pass when the image is one band (16 numbers a
    pixel: cheap for small images, too many to keep for large ones, which recompute them).
    """
    total, weights, diagonal = (torch.zeros_like(noisy) for _ in range(3))
    band = max(stride, BAND_ROWS // stride * stride)
    rows, cols = noisy.shape[1:]
    starts = range(0, rows - BLOCK + 1, band)
    for top in starts:
        bottom = min(rows, top + band + BLOCK - stride)  # the band's blocks start at top, top + stride, ...
        coefficients = cache.get((stride, top))
        if coefficients is None:
            coefficients = _coefficients(noisy[:, top:bottom], stride)
            if len(starts) == 1:
                cache[stride, top] = coefficients
        parts = _filter_band(coefficients.clone(), pilot[:, top:bottom], sigma, stride, (bottom - top, cols),
                             with_diagonal)
        for whole, part in zip((total, weights, diagonal), parts):
            whole[:, top:bottom] += part
    weights.clamp_min_(1e-12)  # the far edge of the padding may lie in no block
    return total / weights, diagonal / weights


def sure_blend(noisy: torch.Tensor, pilot: torch.Tensor, filtered: torch.Tensor, trace: float,
               sigma: float) -> float:
    """The share a in [0, 1] of `pilot + a (filtered - pilot)` that minimises Stein's unbiased risk estimate.

    SURE (Stein 1981) of that blend is |noisy - blend|^2 - n sigma^2 + 2 sigma^2 a trace, the filter being
    linear in the noisy image with `trace` its diagonal's sum, less the pilot's divergence where it is known;
    a pilot counted as fixed (its own dependence on the noise unknown) leans the choice towards it.
    """
    step = filtered - pilot
    agreement = float(((noisy - pilot) * step).sum()) - sigma * sigma * trace
    return min(1.0, max(0.0, agreement / max(float(step.square().sum()), 1e-12)))


def wiener_step(noisy: torch.Tensor, pilot: torch.Tensor, sigma: float, *, strides: Sequence[int] = STRIDES,
                matching: bool = True, blend: bool = True, pilot_divergence: float = 0.0) -> torch.Tensor:
    """The Wiener estimate (C, H, W) in [0, 1] from the noisy image and the pilot, both (C, H, W) in [0, 1].

    `sigma` is the noise std on the 0-1 scale; one blockwise pass per stride, each after the first taking the
    one before as its pilot, then with `matching` the collaborative pass (`blockmatch.py`) on the last one.
    `blend`: the output is the blend of the pilot and the filtered image that SURE expects to be closest to
    the clean image (`sure_blend`), so a pilot better than the filter's output is kept (a well-trained model
    at high noise, which the filter alone would lose up to 11 dB to; with a weak pilot the blend costs 0-0.6
    dB, leaning to the pilot: BENCHMARKS.md, "The Wiener step"). `pilot_divergence`: the pilot's own
    divergence in the noisy image, for the blend's risk estimate (0: the pilot counted as fixed).
    Any size: reflect padding by a block less one on every side, so each pixel lies in as many blocks as any
    other; long images go through in bands of rows.
    """
    if sigma <= 0:
        return noisy.clone()
    noisy, pilot = noisy.float(), pilot.float()
    channels, height, width = noisy.shape
    if channels == 3:
        noisy, pilot = (torch.einsum("ij,jhw->ihw", OPPONENT, image) for image in (noisy, pilot))
    pad = BLOCK - 1
    # Reflect padding needs a side longer than the pad: tiny images are replicated at their edges instead.
    mode = "reflect" if min(height, width) > pad else "replicate"
    padded = F.pad(noisy[None], (pad, pad, pad, pad), mode=mode)[0]
    estimate = F.pad(pilot[None], (pad, pad, pad, pad), mode=mode)[0]
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for last, stride in enumerate(strides, 1 - len(strides)):  # only the last pass's diagonal is used
        with_diagonal = blend and not matching and last == 0
        estimate, diagonal = _wiener_pass(padded, estimate, sigma, stride, cache, with_diagonal=with_diagonal)
    inside = (slice(None), slice(pad, pad + height), slice(pad, pad + width))
    trace = float(diagonal[inside].sum())
    if matching and blend:
        # The collaborative filter's trace for the blend: Hutchinson's estimate with one fixed +-1 probe.
        probe = torch.randint(0, 2, noisy.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
        padded_probe = F.pad(probe[None], (pad, pad, pad, pad), mode=mode)[0]
        estimate, response = collaborative_pass(padded, estimate, sigma, probe=padded_probe)
        trace = float((probe * response[inside]).sum())
    elif matching:
        estimate, _ = collaborative_pass(padded, estimate, sigma)
    out = estimate[inside]
    if blend:
        out = torch.lerp(pilot, out, sure_blend(noisy, pilot, out, trace - pilot_divergence, sigma))
    if channels == 3:
        out = torch.einsum("ji,jhw->ihw", OPPONENT, out)
    return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class WienerStep:
    """The Wiener step as the denoiser runs it: `sigma` given (0-1 scale), or None to estimate it per image."""

    sigma: float | None
    source: str  # where sigma comes from, for the run's description
    matching: bool = True  # the collaborative pass (`blockmatch.py`) after the blockwise ones

    def __call__(self, noisy: torch.Tensor, pilot: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma if self.sigma is not None else estimate_sigma(noisy[None])
        return wiener_step(noisy, pilot, sigma, matching=self.matching)

    def describe(self) -> str:
        how = "on, with block matching" if self.matching else "on, blockwise only"
        if self.sigma is None:
            return f"{how}, noise sigma {self.source}"
        return f"{how}, noise sigma {255 * self.sigma:.3g}/255 ({self.source})"


def choose_wiener(requested: bool | None, sigma: float | None, config: ModelConfig,
                  corruptions: tuple | None, *, matching: bool = True) -> WienerStep | None:
    """The Wiener step for this model, or None.

    `requested` None: on for a model that denoises Gaussian noise (a Gaussian noise model, or --corrupt with
    Gaussian noise only), whose inputs the step's model of the noise fits; off otherwise (masking or
    salt-and-pepper noise is not Gaussian, and a plain VAE is not asked to denoise). `sigma` None: the noise
    model's own sigma, else estimated from each image. `matching`: the collaborative pass too.
    """
    gaussian = config.noise_model == "gaussian" or bool(corruptions) and all(
        c.kind == "gaussian" for c in corruptions)
    if not (gaussian if requested is None else requested):
        return None
    if sigma is not None:
        return WienerStep(sigma, "as given", matching)
    if config.noise_model == "gaussian" and config.noise_sigma > 0:
        return WienerStep(config.noise_sigma, "the model's noise model", matching)
    return WienerStep(None, "estimated from each image", matching)
