"""The Wiener step of denoising: the model's clean estimate as the pilot of an empirical Wiener filter.

BM3D's second stage (Dabov et al. 2007) with the model in place of its first: in every 8x8 block of the noisy
image (overlapping, a few pixels apart), each DCT coefficient is kept in the proportion P^2 / (P^2 + sigma^2),
P the pilot's coefficient there, and the blocks are averaged with weights 1 / (sigma^2 sum gains^2). Where the
pilot has signal, the noisy image's own detail comes back (a model's decode loses fine detail the noise does
not hide); where it has none, the noise goes. Two such passes, each taking the one before as its pilot, then
the collaborative pass of `blockmatch.py`, which filters each block together with the blocks most like it
(`--no-block-matching` leaves it out: the step 10 times faster). Last, the output is blended with the pilot
by Stein's unbiased risk estimate, so a pilot already better than the filter's output stays; the estimate
counts how both depend on the noise from the model's estimate of the noisy image moved a little along a
fixed direction, and the step taken on that too (Monte-Carlo SURE); the same estimate picks the collaborative
pass's pilot, between the model's estimate and the blockwise passes' output. Colour images are filtered in an
orthonormal opponent colour space, so the noise keeps its sigma there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..models.noise_level import estimate_image_sigma
from .blockmatch import collaborative_pass
from .transforms import BLOCK, OPPONENT, block_dct, dct_basis

# Output rows filtered at once: bounds the blocks held (64 numbers each per pixel / stride^2) to a few
# hundred MiB for images thousands of pixels wide.
BAND_ROWS = 128
# The passes' block strides. The second pass takes the first's output as its pilot, which holds the detail the
# model's decode lost: on held-out faces and detail-rich images at noise std 5-25, +0.2 to +4 dB over one pass,
# about the same at 50; more passes let noise back in at high noise. Strides 4 then 3 cost a third of two
# passes at stride 2 for 0.1-0.2 dB less (BENCHMARKS.md, "The Wiener step").
STRIDES = (4, 3)
# The blend's divergences come from the model's estimate of the noisy image moved by a tenth of sigma along a
# +-1 direction (at least 1/2550, where float rounding would swamp the difference). Counted, the blend stops
# leaning to a pilot worse than the filter and still keeps a better one: +0.1 to +0.9 dB on held-out images
# against the pilot counted as fixed (BENCHMARKS.md, "The blend by Monte-Carlo SURE").
PROBE_STEP, MIN_PROBE_STEP = 0.1, 1 / 2550


def _filter_band(noisy_coefficients: torch.Tensor, pilot: torch.Tensor, sigma: float, stride: int,
                 size: tuple[int, int], with_diagonal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over a band of `size` (h, w): the weighted sums of the filtered blocks, their weights, and (if asked,
    else zeros) the weighted sums of the filter's diagonal (how much of each noisy pixel stays in it)."""
    energy = block_dct(pilot, stride).square_()
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
            coefficients = block_dct(noisy[:, top:bottom], stride)
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

    SURE (Stein 1981) of that blend is |noisy - blend|^2 - n sigma^2 + 2 sigma^2 (div pilot + a trace), with
    `trace` the filtered image's divergence less the pilot's: measured by a finite difference (`wiener_step`'s
    `moved`), or the filter's trace with its pilot held fixed, less the pilot's divergence where it is known;
    a pilot counted as fixed (its own dependence on the noise unknown) leans the choice towards it.
    """
    step = filtered - pilot
    agreement = float(((noisy - pilot) * step).sum()) - sigma * sigma * trace
    return min(1.0, max(0.0, agreement / max(float(step.square().sum()), 1e-12)))


def wiener_step(noisy: torch.Tensor, pilot: torch.Tensor, sigma: float, *, strides: Sequence[int] = STRIDES,
                matching: bool = True, blend: bool = True, pilot_divergence: float = 0.0,
                moved: Moved | None = None, sure_pilot: bool = True) -> torch.Tensor:
    """The Wiener estimate (C, H, W) in [0, 1] from the noisy image and the pilot, both (C, H, W) in [0, 1].

    `sigma` is the noise std on the 0-1 scale; one blockwise pass per stride, each after the first taking the
    one before as its pilot, then with `matching` the collaborative pass (`blockmatch.py`) on the last one.
    `blend`: the output is the blend of the pilot and the filtered image that SURE expects to be closest to
    the clean image (`sure_blend`), so a pilot better than the filter's output is kept (a well-trained model
    at high noise, which the filter alone would lose up to 11 dB to).
    What the risk estimate knows of how each depends on the noise: with `moved` (the noisy image moved along
    a direction, and the model's estimate of it), the divergence of both the pilot and the filtered image, by
    one finite difference each (Monte-Carlo SURE, Ramani, Blu & Unser 2008: the filter's dependence on the
    noise through its pilot included); and with `sure_pilot`, the collaborative pass's pilot is the blend of
    the model's estimate and the blockwise passes' output that the same estimate prefers. Without `moved`,
    the filter's trace with its pilot held fixed, less `pilot_divergence` (0: the pilot counted as fixed,
    which leans the blend to it).
    Any size: reflect padding by a block less one on every side, so each pixel lies in as many blocks as any
    other; long images go through in bands of rows.
    """
    if sigma <= 0:
        return noisy.clone()
    channels, height, width = noisy.shape
    to_filter, from_filter = _colour_space(channels)
    noisy, pilot = to_filter(noisy.float()), to_filter(pilot.float())
    pad = BLOCK - 1
    # Reflect padding needs a side longer than the pad: tiny images are replicated at their edges instead.
    mode = "reflect" if min(height, width) > pad else "replicate"

    def padded(image: torch.Tensor) -> torch.Tensor:
        return F.pad(image[None], (pad, pad, pad, pad), mode=mode)[0]

    inside = (slice(None), slice(pad, pad + height), slice(pad, pad + width))
    if moved is not None and blend:
        direction = to_filter(moved.direction)  # orthonormal: the divergence is the same in either space
        moved_noisy, moved_pilot = noisy + moved.step * direction, to_filter(moved.pilot.float())
        images = [padded(noisy), padded(moved_noisy)]
        # Both through the blockwise passes at once: their channels are filtered independently anyway.
        both, _ = _blockwise_passes(torch.cat(images), torch.cat([padded(pilot), padded(moved_pilot)]), sigma, strides)
        filtered = list(both.split(channels))

        def gap_of(estimate: torch.Tensor, moved_estimate: torch.Tensor) -> float:
            """The estimate's divergence less the pilot's, by the one finite difference along the direction."""
            return float((direction * (moved_estimate - estimate - moved_pilot + pilot)).sum()) / moved.step

        if matching:  # the blocks matched once, in the first estimate
            if sure_pilot:
                # The collaborative pass's pilot: the model's estimate, the blockwise output, or between, as SURE
                # expects best. A good model's estimate loses detail to the blockwise passes (faces at std 25:
                # 31.2 dB alone, 30.6 after them), a weak one gains (BENCHMARKS.md, "Where the gap to BM3D is").
                blocked, moved_blocked = (f[inside] for f in filtered)
                share = sure_blend(noisy, pilot, blocked, gap_of(blocked, moved_blocked), sigma)
                filtered = [padded(torch.lerp(pilot, blocked, share)),
                            padded(torch.lerp(moved_pilot, moved_blocked, share))]
            filtered = [f for [f] in collaborative_pass([(e, [image]) for image, e in zip(images, filtered)], sigma)]
        out, moved_out = (f[inside] for f in filtered)
        gap = gap_of(out, moved_out)
    else:
        image, estimate = padded(noisy), padded(pilot)
        estimate, diagonal = _blockwise_passes(image, estimate, sigma, strides, with_diagonal=blend and not matching)
        trace = float(diagonal[inside].sum())
        if matching and blend:
            # The collaborative filter's trace: Hutchinson's estimate with one fixed +-1 probe.
            probe = _signs(noisy.shape, seed=0)
            [[estimate, response]] = collaborative_pass([(estimate, [image, padded(probe)])], sigma)
            trace = float((probe * response[inside]).sum())
        elif matching:
            [[estimate]] = collaborative_pass([(estimate, [image])], sigma)
        out, gap = estimate[inside], trace - pilot_divergence
    if blend:
        out = torch.lerp(pilot, out, sure_blend(noisy, pilot, out, gap, sigma))
    return from_filter(out).clamp_(0.0, 1.0)


def _signs(shape: torch.Size, *, seed: int) -> torch.Tensor:
    """A fixed direction of +-1 values (Hutchinson's probe): the same for every image of a shape."""
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


def _colour_space(channels: int):
    """To and from the filter's colour space: the opponent one for colour (orthonormal, so white noise of std
    sigma stays white and sigma), the image's own for gray."""
    if channels != 3:
        return (lambda image: image), (lambda image: image)
    return (lambda image: torch.einsum("ij,jhw->ihw", OPPONENT, image),
            lambda image: torch.einsum("ji,jhw->ihw", OPPONENT, image))


def _blockwise_passes(image: torch.Tensor, pilot: torch.Tensor, sigma: float, strides: Sequence[int], *,
                      with_diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The blockwise passes on a padded image, each after the first taking the one before as its pilot: the
    last one's estimate and diagonal (computed only `with_diagonal`, else zeros)."""
    cache: dict[tuple[int, int], torch.Tensor] = {}
    diagonal = torch.zeros_like(pilot)
    for last, stride in enumerate(strides, 1 - len(strides)):
        pilot, diagonal = _wiener_pass(image, pilot, sigma, stride, cache, with_diagonal=with_diagonal and last == 0)
    return pilot, diagonal


@dataclass(frozen=True)
class Moved:
    """The noisy image moved by `step` along `direction` (C, H, W), and the model's estimate of it."""

    direction: torch.Tensor
    step: float
    pilot: torch.Tensor


@dataclass(frozen=True)
class Probe:
    """The noisy image moved along a +-1 direction: the model's estimate of it and of the image itself give the
    pilot's divergence in the noisy image by one finite difference (Ramani, Blu & Unser 2008)."""

    direction: torch.Tensor  # (C, H, W), each value +-1
    step: float  # how far the image is moved, on the 0-1 scale
    sigma: float  # the noise std the step assumes for this image

    def moved(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy + self.step * self.direction

    def divergence(self, pilot: torch.Tensor, moved_pilot: torch.Tensor) -> float:
        """Hutchinson's estimate of the pilot's divergence: direction . (f(x + step direction) - f(x)) / step."""
        return float((self.direction * (moved_pilot.float() - pilot.float())).sum()) / self.step


@dataclass(frozen=True)
class WienerStep:
    """The Wiener step as the denoiser runs it: `sigma` given (0-1 scale), or None to estimate it per image."""

    sigma: float | None
    source: str  # where sigma comes from, for the run's description
    matching: bool = True  # the collaborative pass (`blockmatch.py`) after the blockwise ones
    divergence: bool = True  # the Monte-Carlo blend: one more model pass per image, on a moved copy

    def sigma_of(self, noisy: torch.Tensor) -> float:
        return self.sigma if self.sigma is not None else estimate_image_sigma(noisy)

    def probe(self, noisy: torch.Tensor) -> Probe | None:
        """How to move the noisy image for the blend's divergences, or None when the blend counts the pilot
        as fixed. One fixed direction for every image, as for the filter's own trace: the command and the API
        give an image the same output."""
        if not self.divergence:
            return None
        sigma = self.sigma_of(noisy)
        if sigma <= 0:
            return None
        direction = _signs(noisy.shape, seed=1)
        return Probe(direction, max(PROBE_STEP * sigma, MIN_PROBE_STEP), sigma)

    def __call__(self, noisy: torch.Tensor, pilot: torch.Tensor, probe: Probe | None = None,
                 moved_pilot: torch.Tensor | None = None) -> torch.Tensor:
        """The step on one image; with `probe` and the model's estimate of `probe.moved(noisy)`, the blend
        counts the pilot's and the filtered image's divergence (Monte-Carlo SURE), else the pilot as fixed."""
        if probe is None or moved_pilot is None:
            return wiener_step(noisy, pilot, self.sigma_of(noisy), matching=self.matching)
        return wiener_step(noisy, pilot, probe.sigma, matching=self.matching,
                           moved=Moved(probe.direction, probe.step, moved_pilot))

    def describe(self) -> str:
        how = "on, with block matching" if self.matching else "on, blockwise only"
        how += ", Monte-Carlo SURE blend" if self.divergence else ", SURE blend with the pilot held fixed"
        if self.sigma is None:
            return f"{how}, noise sigma {self.source}"
        return f"{how}, noise sigma {255 * self.sigma:.3g}/255 ({self.source})"


def choose_wiener(requested: bool | None, sigma: float | None, config: ModelConfig,
                  corruptions: tuple | None, *, matching: bool = True) -> WienerStep | None:
    """The Wiener step for this model, or None.

    `requested` None: on for a model that denoises Gaussian noise (a Gaussian noise model, --corrupt with
    Gaussian noise only, or --recorrupt), whose inputs the step's model of the noise fits; off otherwise (masking or
    salt-and-pepper noise is not Gaussian, and a plain VAE is not asked to denoise). `sigma` None: the noise
    model's own sigma, else estimated from each image. `matching`: the collaborative pass too.
    """
    gaussian = config.noise_model == "gaussian" or bool(corruptions) and all(
        c.kind in ("gaussian", "recorrupt") for c in corruptions)
    if not (gaussian if requested is None else requested):
        return None
    if sigma is not None:
        return WienerStep(sigma, "as given", matching)
    if config.noise_model == "gaussian" and config.noise_sigma > 0:
        return WienerStep(config.noise_sigma, "the model's noise model", matching)
    return WienerStep(None, "estimated from each image", matching)
