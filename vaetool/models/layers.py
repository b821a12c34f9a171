"""Building blocks shared by the model families: float32 islands under autocast, GroupNorm, residual stages."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def full_precision(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` in float32 even under bf16/fp16 autocast.

    Used for the layers that touch pixels or the latent (the first and last convolution, the linear
    heads): a bf16 first convolution made the model learn markedly worse (BENCHMARKS.md, "bf16 on the CPU").
    """
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def groups(width: int) -> int:
    return math.gcd(width, 8)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 under autocast; the output keeps the input's dtype.

    bf16 GroupNorm kernels are slow on CPUs (and less exact); the parameters and checkpoint names are GroupNorm's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(x))): extra depth at constant resolution."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = GroupNorm32(groups(width), width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(self.norm(x)))


def stage(conv: nn.Module, width: int, blocks: int) -> nn.Sequential:
    """A resampling conv, GroupNorm, SiLU, then `blocks` residual blocks."""
    layers = [conv, GroupNorm32(groups(width), width), nn.SiLU()]
    layers += [ResidualBlock(width) for _ in range(blocks)]
    return nn.Sequential(*layers)


def upsample_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """Nearest upsampling then a 3x3 conv: no checkerboard artefacts (Odena et al. 2016)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1))


@torch.no_grad()
def icnr_(conv: nn.Conv2d, group: int) -> None:
    """Give the `group` sub-pixel outputs of each channel the same filter: a pixel shuffle then starts as nearest upsampling."""
    weight = conv.weight.view(-1, group, *conv.weight.shape[1:])  # (C, group, in, k, k)
    weight.copy_(weight[:, :1].expand_as(weight))
    bias = conv.bias.view(-1, group)
    bias.copy_(bias[:, :1].expand_as(bias))
