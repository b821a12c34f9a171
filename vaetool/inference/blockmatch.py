"""Collaborative Wiener filtering: BM3D's second stage (Dabov et al. 2007) with the model's estimate as its pilot.

For each reference 8x8 block on a grid a few pixels apart, the `GROUP` blocks of the pilot most like it within a
search window are stacked. The stack's 3-D transform (a 2-D DCT of each block, then an orthonormal Haar
transform across the stack) is taken of the noisy image, each coefficient kept in the proportion
P^2 / (P^2 + sigma^2) of the pilot's P, and every block of the stack goes back to its place, weighted by
1 / (sigma^2 sum gains^2) and a Kaiser window. Similar blocks anywhere near share their signal: a stroke, an
edge or a texture repeated in the image keeps its detail at noise levels where one block alone cannot tell
it from the noise.

Images here are padded and in the filter's colour space (`wiener.py` does both); positions are those of the
blocks' top-left pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .transforms import BLOCK, dct_basis, haar_basis, kaiser_window

# Blocks per group: 16 gains 0.05 dB or less with a model's pilot, for 1.6 times the time.
GROUP = 8
# Reference blocks every 3 pixels, searched within +-8: a window of +-12 or references every 2 pixels gain 0.05
# dB or less on held-out images for 1.4 and 1.7 times the time (BENCHMARKS.md, "The Wiener step").
STRIDE = 3
RADIUS = 8
# The block distances of a band of reference rows are (2 RADIUS + 1)^2 numbers a pixel: bands keep them near
# 64 MiB for images thousands of pixels wide.
BAND_NUMBERS = 16 * 2 ** 20


def reference_grid(size: int, stride: int) -> torch.Tensor:
    """Block positions 0, stride, ... along one side of `size` block positions, always with the last one."""
    steps = list(range(0, size, stride))
    if steps[-1] != size - 1:
        steps.append(size - 1)
    return torch.tensor(steps)


def match_blocks(luma: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, group: int,
                 radius: int) -> torch.Tensor:
    """For references at (rows[i], cols[j]) of the (h, w) image: the flat positions (y * w + x) of the `group`
    blocks nearest each in squared distance within +-radius, the reference first; (len(rows) * len(cols), group).

    The distances of every offset come from one unfold of the band (each shift of it a column) and box sums.
    """
    height, width = luma.shape
    positions_y, positions_x = height - BLOCK + 1, width - BLOCK + 1
    top, bottom = int(rows[0]), int(rows[-1])
    first, last = top - radius, bottom + BLOCK + radius  # the rows the band's candidates cover
    band = luma[max(0, first):min(height, last)][None, None]
    band = F.pad(band, (radius, radius, max(0, -first), max(0, last - height)))  # zeros outside: masked below
    span_y, span_x = bottom - top + BLOCK, width
    shifted = F.unfold(band, (span_y, span_x)).view(span_y, span_x, -1)  # (.., .., offsets)
    centre = (2 * radius + 1) * radius + radius
    squared = (shifted - shifted[..., centre:centre + 1]).square_()
    within = torch.arange(BLOCK)
    # Box sums at the references only: down each block's 8 rows, then along its 8 columns.
    down = squared[(rows - top)[:, None] + within].sum(1)  # (rows, span_x, offsets)
    distance = down[:, cols[:, None] + within].sum(2).permute(2, 0, 1)  # (offsets, rows, cols)
    offsets = torch.arange(-radius, radius + 1)
    dy, dx = offsets.repeat_interleave(2 * radius + 1), offsets.repeat(2 * radius + 1)
    target_y = rows[None, :, None] + dy[:, None, None]
    target_x = cols[None, None, :] + dx[:, None, None]
    outside = (target_y < 0) | (target_y >= positions_y) | (target_x < 0) | (target_x >= positions_x)
    distance = distance.masked_fill(outside, math.inf)
    distance[centre] = -1.0  # the reference itself first, even among exact copies (flat regions)
    nearest = distance.flatten(1).topk(group, dim=0, largest=False).indices  # (group, references)
    flat = (target_y * width + target_x).expand_as(distance).flatten(1)
    return flat.gather(0, nearest).T


def collaborative_pass(noisy: torch.Tensor, pilot: torch.Tensor, sigma: float, *, probe: torch.Tensor | None = None,
                       group: int = GROUP, stride: int = STRIDE, radius: int = RADIUS
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The collaborative Wiener estimate (C, h, w) of the padded noisy image from the pilot, blocks matched in
    the pilot's first channel (luminance). With `probe` (C, h, w): also the same linear filter (the pilot's
    gains and matches held fixed) applied to it, for Hutchinson's estimate of the filter's trace."""
    channels, height, width = noisy.shape
    radius = max(0, min(radius, (min(height, width) - BLOCK) // 2))
    # No more than a corner's window holds, and a power of two for the Haar transform.
    group = min(group, 2 ** int(math.log2((radius + 1) ** 2)))
    rows = reference_grid(height - BLOCK + 1, stride)
    cols = reference_grid(width - BLOCK + 1, stride)
    dct = dct_basis(BLOCK)
    haar, window = haar_basis(group), kaiser_window()
    within = torch.arange(BLOCK)
    block_pixels = (within[:, None] * width + within[None, :]).reshape(-1)  # offsets of a block's 64 pixels
    # The pilot first, then the images filtered (the noisy one, and the probe), stacked: one gather and one
    # transform for all.
    stacked = torch.cat([pilot, noisy] + ([probe] if probe is not None else [])).reshape(-1, height * width)
    filtered_count = stacked.shape[0] // channels - 1
    totals = torch.zeros(filtered_count * channels, height * width)
    weights = torch.zeros(channels, height * width)
    band = max(1, BAND_NUMBERS // ((2 * radius + 1) ** 2 * width * stride))
    for start in range(0, len(rows), band):
        matched = match_blocks(pilot[0], rows[start:start + band], cols, group, radius)  # (n, group)
        pixels = (matched[..., None] + block_pixels).reshape(-1)  # (n * group * 64)
        blocks = stacked[:, pixels].view(-1, *matched.shape, BLOCK * BLOCK) @ dct.T
        spectra = torch.einsum("jk,cnkm->cnjm", haar, blocks)  # the groups' 3-D transforms
        energy = spectra[:channels].square()
        gain = energy.div_(energy + sigma * sigma)
        weight = 1.0 / (sigma * sigma * gain.square().sum((-1, -2))).clamp_min(1e-12)  # (C, n)
        placed = (weight[:, :, None, None] * window).expand(channels, *matched.shape, -1).reshape(channels, -1)
        weights.index_add_(1, pixels, placed)
        kept = spectra[channels:].reshape(filtered_count, channels, *gain.shape[1:]).mul_(gain)
        back = torch.einsum("jk,cnjm->cnkm", haar, kept.reshape(-1, *gain.shape[1:])) @ dct
        back = back.reshape(filtered_count, channels, -1).mul_(placed)
        totals.index_add_(1, pixels, back.view(filtered_count * channels, -1))
    weights.clamp_min_(1e-12)
    out = (totals.view(filtered_count, channels, -1) / weights).view(filtered_count, channels, height, width)
    return out[0], out[1] if probe is not None else None


