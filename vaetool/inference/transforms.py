"""The orthonormal transforms of the Wiener step: the blocks' DCT, the Haar transform across a group of blocks,
the blocks' window and the opponent colour space."""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 8


@functools.lru_cache(maxsize=4)
def dct_basis(block: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II of `block` x `block` blocks, as a (block^2, block^2) matrix on flattened rows."""
    k = torch.arange(block, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * block)) * math.sqrt(2.0 / block)
    basis[0] /= math.sqrt(2.0)
    return torch.kron(basis, basis).float()


# Rows: luminance, red-blue, green-magenta; orthonormal, so white noise of std sigma stays white and sigma.
OPPONENT = torch.tensor([[1 / math.sqrt(3)] * 3,
                         [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)],
                         [1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)]])


@functools.lru_cache(maxsize=4)
def haar_basis(size: int) -> torch.Tensor:
    """The orthonormal Haar transform of `size` (a power of two) values, as a (size, size) matrix of rows."""
    basis = torch.ones(1, 1, dtype=torch.float64)
    while basis.shape[0] < size:
        n = basis.shape[0]
        basis = torch.cat([torch.kron(basis, torch.tensor([[1.0, 1.0]], dtype=torch.float64)),
                           torch.kron(torch.eye(n, dtype=torch.float64),
                                      torch.tensor([[1.0, -1.0]], dtype=torch.float64))]) / math.sqrt(2.0)
    return basis.float()


@functools.lru_cache(maxsize=1)
def kaiser_window() -> torch.Tensor:
    """BM3D's block window (Kaiser, beta 2), flattened: blocks weigh less at their edges, so seams do not show."""
    window = torch.kaiser_window(BLOCK, periodic=False, beta=2.0)
    return (window[:, None] * window[None, :]).reshape(BLOCK * BLOCK)


def block_dct(images: torch.Tensor, stride: int) -> torch.Tensor:
    """The DCT coefficients (N, rows, cols, 64) of the 8x8 blocks of images (N, h, w), `stride` pixels apart."""
    blocks = images.unfold(1, BLOCK, stride).unfold(2, BLOCK, stride)  # (N, rows, cols, 8, 8), a view
    return blocks.reshape(*blocks.shape[:3], BLOCK * BLOCK) @ dct_basis(BLOCK).T
