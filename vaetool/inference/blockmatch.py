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
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .transforms import BLOCK, block_dct, dct_basis, haar_basis, kaiser_window

# Blocks per group: 16 gains 0.05 dB or less with a model's pilot, for 1.6 times the time.
GROUP = 8
# Reference blocks every 4 pixels, searched within +-8: every 3 pixels gained 0.00-0.02 dB on held-out faces and
# detail-rich images at std 15-50 for 1.6-1.8 times the step's time; every 2 pixels or a window of +-12 gain
# 0.05 dB or less again for 1.7 and 1.4 times (BENCHMARKS.md, "The Wiener step").
STRIDE = 4
RADIUS = 8
# The block distances of a band of reference rows are (2 RADIUS + 1)^2 numbers a pixel: bands keep them near
# 64 MiB for images thousands of pixels wide.
BAND_NUMBERS = 16 * 2 ** 20
# And a few hundred stacks a band, so that the stacks' coefficients (6,144 numbers a stack for a colour image
# and its moved copy) stay near the processor's caches: up to twice as fast on images hundreds of pixels wide,
# the same output (BENCHMARKS.md, "The Wiener step's speed").
STACKS_PER_BAND = 320


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

    One vertical offset at a time (its squared differences for every horizontal offset stay in cache), and
    the blocks' sums taken at the references only: three to seven times faster than holding every offset's
    differences at once and gathering their rows.
    """
    height, width = luma.shape
    positions_y, positions_x = height - BLOCK + 1, width - BLOCK + 1
    top, bottom = int(rows[0]), int(rows[-1])
    first, last = top - radius, bottom + BLOCK + radius  # the rows the band's candidates cover
    band = luma[max(0, first):min(height, last)][None, None]
    band = F.pad(band, (radius, radius, max(0, -first), max(0, last - height)))[0, 0]  # zeros outside: masked
    span_y, span_x = bottom - top + BLOCK, width
    reference = band[radius:radius + span_y, None, radius:radius + span_x]
    side = 2 * radius + 1
    # Down each block's 8 rows: a product with a 0/1 matrix, the band's rows being few; along its 8 columns:
    # pairwise sums, whose work grows with the width where a matrix's would grow with its square.
    down_sums = torch.zeros(len(rows), span_y).scatter_(1, (rows - top)[:, None] + torch.arange(BLOCK), 1.0)
    squared = torch.empty(span_y, side, span_x)
    down = torch.empty(len(rows), side, span_x)
    distance = torch.empty(side, len(rows), side, len(cols))  # (dy, rows, dx, cols)
    for dy in range(side):
        candidates = band[dy:dy + span_y].unfold(1, span_x, 1)  # (span_y, dx, span_x), a view
        torch.sub(candidates, reference, out=squared).square_()
        torch.mm(down_sums, squared.view(span_y, -1), out=down.view(len(rows), -1))
        torch.index_select(_block_sums(down, 2), 2, cols, out=distance[dy])
    distance = distance.transpose(1, 2).reshape(side * side, len(rows), len(cols))  # (offsets, rows, cols)
    offsets = torch.arange(-radius, radius + 1)
    dy, dx = offsets.repeat_interleave(side), offsets.repeat(side)
    target_y = rows[None, :, None] + dy[:, None, None]
    target_x = cols[None, None, :] + dx[:, None, None]
    outside = (target_y < 0) | (target_y >= positions_y) | (target_x < 0) | (target_x >= positions_x)
    distance = distance.masked_fill_(outside, math.inf)
    distance[side * radius + radius] = -1.0  # the reference itself first, even among exact copies (flat regions)
    nearest = distance.flatten(1).topk(group, dim=0, largest=False).indices  # (group, references)
    flat = (target_y * width + target_x).expand_as(distance).flatten(1)
    return flat.gather(0, nearest).T


def _block_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of every BLOCK (8) consecutive values along `dim`, by three pairwise sums of shifted views."""
    for half in (1, 2, 4):
        values = values.narrow(dim, 0, values.shape[dim] - half) + values.narrow(dim, half, values.shape[dim] - half)
    return values


def collaborative_pass(sets: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]], sigma: float, *,
                       group: int | None = None, stride: int | None = None,
                       radius: int | None = None) -> list[list[torch.Tensor]]:
    """The collaborative Wiener estimates of padded images (C, h, w): for each (pilot, images) of `sets`,
    every image filtered with that pilot's gains, the blocks matched once, in the first pilot's first channel
    (luminance).

    The images of a set are, e.g., the noisy image and a probe for Hutchinson's estimate of the filter's
    trace (the same linear filter applied to it); a second set, the noisy image moved along a direction with
    the model's estimate of it as the pilot, for the step's divergence by a finite difference (the matches are
    piecewise constant in the image, so holding them is exact there).

    The stacks gather the DCT coefficients of their blocks (taken block by block, or once per position where
    the stacks hold more blocks than there are positions), and the filtered stacks are summed per position
    before one inverse DCT and the overlap-add.
    """
    channels, height, width = sets[0][0].shape
    # None: the module's settings, read at the call (a benchmark sweeps them).
    group, stride, radius = group or GROUP, stride or STRIDE, RADIUS if radius is None else radius
    radius = max(0, min(radius, (min(height, width) - BLOCK) // 2))
    # No more than a corner's window holds, and a power of two for the Haar transform.
    group = min(group, 2 ** int(math.log2((radius + 1) ** 2)))
    positions_y, positions_x = height - BLOCK + 1, width - BLOCK + 1
    rows = reference_grid(positions_y, stride)
    cols = reference_grid(positions_x, stride)
    dct = dct_basis(BLOCK)
    haar, window = haar_basis(group), kaiser_window()
    # Every pilot and image stacked: one transform for all. Set k's pilot at pilot_at[k], its images after it.
    layers = [layer for pilot, images in sets for layer in (pilot, *images)]
    counts = [len(images) for _, images in sets]
    pilot_at = [sum(1 + c for c in counts[:k]) * channels for k in range(len(sets))]
    stacked = torch.cat(layers)  # (L C, h, w)
    totals = [torch.zeros(c * channels, height, width) for c in counts]
    weights = [torch.zeros(channels, height, width) for _ in sets]
    band = max(1, min(BAND_NUMBERS // ((2 * radius + 1) ** 2 * width * stride), STACKS_PER_BAND // len(cols)))
    for start in range(0, len(rows), band):
        references = rows[start:start + band]
        # The block positions this band's stacks can take, and the pixel rows that hold them.
        first, last = max(0, int(references[0]) - radius), min(positions_y, int(references[-1]) + radius + 1)
        matched = match_blocks(sets[0][0][0], references, cols, group, radius)  # (n, group): y * width + x
        # Group-major (the i-th block of every stack together): the Haar transform across the stacks is then
        # one wide product per layer instead of one 8x8 product per stack (about 1 ms of the pass's 20 for a
        # 64x64 image and its moved copy).
        local = ((matched // width - first) * positions_x + matched % width).T.reshape(-1)
        stacks = len(matched)
        span = (last - first + BLOCK - 1, width)
        positions = (last - first) * positions_x
        taken = _block_coefficients(stacked[:, first:first + span[0]], local, dense=len(local) >= positions)
        spectra = (haar @ taken.view(-1, group, stacks * BLOCK * BLOCK)).view(-1, group, stacks, BLOCK * BLOCK)
        for k, count in enumerate(counts):
            at = pilot_at[k]
            energy = spectra[at:at + channels].square()
            gain = energy.div_(energy + sigma * sigma)  # (C, group, n, 64)
            weight = 1.0 / (sigma * sigma * gain.square().sum((1, 3))).clamp_min(1e-12)  # (C, n)
            gain.mul_(weight[:, None, :, None])  # each stack's weight, applied with its gains
            kept = spectra[at + channels:at + channels * (1 + count)].view(count, *gain.shape).mul_(gain)
            back = (haar.T @ kept.view(count * channels, group, -1)).view(count * channels, -1, BLOCK * BLOCK)
            summed = torch.zeros(back.shape[0], positions, BLOCK * BLOCK).index_add_(1, local, back)
            weight_sums = torch.zeros(channels, positions).index_add_(
                1, local, weight[:, None, :].expand(-1, group, -1).reshape(channels, -1))
            pixels = torch.matmul(dct.T, summed.transpose(1, 2))  # (count C, 64, positions), contiguous
            totals[k][:, first:first + span[0]] += _overlap_add(pixels, window, span)
            weights[k][:, first:first + span[0]] += _spread(weight_sums.view(channels, -1, positions_x), window)
    out = []
    for total, weight, count in zip(totals, weights, counts):
        estimates = total.view(count, channels, height, width) / weight.clamp_min_(1e-12)
        out.append(list(estimates.unbind(0)))
    return out


def _block_coefficients(images: torch.Tensor, at: torch.Tensor, *, dense: bool) -> torch.Tensor:
    """The DCT coefficients (N, len(at), 64) of the blocks at flat positions `at` (y * (w - 7) + x) of images
    (N, h, w). `dense`: every position's DCT once, then the blocks' (for stacks that hold more blocks than
    there are positions); else each block's DCT as the stacks take it."""
    positions_x = images.shape[2] - BLOCK + 1
    if dense:
        return block_dct(images, 1).flatten(1, 2).index_select(1, at)
    # Each block as its 8 rows of 8 pixels, gathered from every row's runs of 8: a copy of 8 numbers a pixel
    # where all the blocks would be 64.
    runs = images.unfold(2, BLOCK, 1).reshape(images.shape[0], -1, BLOCK)
    rows_at = ((at // positions_x)[:, None] + torch.arange(BLOCK)) * positions_x + (at % positions_x)[:, None]
    blocks = runs.index_select(1, rows_at.reshape(-1)).view(images.shape[0], -1, BLOCK * BLOCK)
    return blocks @ dct_basis(BLOCK).T


def _overlap_add(per_position: torch.Tensor, window: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every position's block (N, 64, positions) times the window and put back at its place, summed where
    blocks overlap: (N, h, w)."""
    # `fold` is fast on this contiguous layout (a quarter of the time it takes on a transposed one).
    return F.fold(per_position * window[:, None], size, BLOCK)[:, 0]


def _spread(per_position: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One value per block position (N, rows, cols), times the window over its block, summed where blocks
    overlap: (N, rows + 7, cols + 7). A convolution of the zero-padded values with the flipped window: a third
    of the time of `fold` on the window's 64 copies."""
    kernel = window.view(1, 1, BLOCK, BLOCK).flip(2, 3)
    return F.conv2d(F.pad(per_position[:, None], (BLOCK - 1,) * 4), kernel)[:, 0]
