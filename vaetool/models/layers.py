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


# (output phase, low-resolution tap, 3x3 tap): along one axis, output row 2i + phase of a 3x3 conv over the
# nearest-upsampled map reads low-resolution rows i - 1 + tap; phase 0 sees rows (i-1: w0, i: w1 + w2), phase 1
# rows (i: w0 + w1, i+1: w2). Zero padding at either resolution is the same zeros.
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],
                            [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernels (4 O, I, 3, 3) that give, at low resolution, the 4 output phases of a 3x3 conv
    (O, I, 3, 3) over a 2x nearest-upsampled map, ordered for `pixel_shuffle(., 2)`."""
    taps = _PHASE_TAPS.to(weight.device, weight.dtype)
    out_ch, in_ch = weight.shape[:2]
    phased = torch.einsum("akr,bls,oirs->oabikl", taps, taps, weight)  # (O, 2, 2, I, 3, 3)
    return phased.reshape(4 * out_ch, in_ch, 3, 3)


def conv_upsampled(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(nearest_upsample_2x(x))` for a 3x3, padding-1 conv, computed without the upsampled map.

    The same arithmetic as upsampling first (up to rounding), but the conv runs at the input's resolution
    with 4x the output channels and a pixel shuffle interleaves them: it skips writing, reading and (in
    the backward pass) reducing a map 4x the input's size, which pays on large maps (BENCHMARKS.md,
    "Upsampling without the upsampled map").
    """
    bias = conv.bias.repeat_interleave(4) if conv.bias is not None else None
    return F.pixel_shuffle(F.conv2d(x, phase_kernels(conv.weight), bias, padding=1), 2)


# From this input side up the conv runs at low resolution (conv_upsampled); below it, the 4x-wide conv on a
# small map costs more than the upsampled map it saves (BENCHMARKS.md, "Upsampling without the upsampled map").
PHASED_FROM = 16


class UpsampleConv(nn.Sequential):
    """Nearest 2x upsampling then a 3x3 conv: no checkerboard artefacts (Odena et al. 2016).

    Kept as (Upsample, Conv2d) so checkpoints name the conv `<stage>.0.1.*`; on maps from PHASED_FROM up
    the forward pass is `conv_upsampled`, which gives the same result without the upsampled map.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < PHASED_FROM:
            return super().forward(x)
        return conv_upsampled(self[1], x)


@torch.no_grad()
def icnr_(conv: nn.Conv2d, group: int) -> None:
    """Give the `group` sub-pixel outputs of each channel one filter: a pixel shuffle starts as nearest upsampling."""
    weight = conv.weight.view(-1, group, *conv.weight.shape[1:])  # (C, group, in, k, k)
    weight.copy_(weight[:, :1].expand_as(weight))
    bias = conv.bias.view(-1, group)
    bias.copy_(bias[:, :1].expand_as(bias))


def encoder_stages(config) -> nn.Sequential:
    """The down stages every family's encoder starts with, for the config's channels, patch and widths."""
    return down_stages(config.channels * config.patch**2, config.widths, blocks=config.blocks, patch=config.patch)


def down_stages(in_channels: int, widths: tuple[int, ...], *, blocks: int, patch: int) -> nn.Sequential:
    """One stage per width, each halving the resolution; the first keeps it when the input is patch-folded.

    Stage i's output is at 1/2**(i+1) of the image either way.
    """
    stages = []
    for index, width in enumerate(widths):
        stride = 1 if (index == 0 and patch == 2) else 2
        stages.append(stage(nn.Conv2d(in_channels, width, 3, stride=stride, padding=1), width, blocks))
        in_channels = width
    return nn.Sequential(*stages)


def run_down(stages: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output, finest first; the first conv, which sees pixels, runs in float32."""
    # Unpacking the first stage (not wrapping it) keeps the checkpoint's parameter names.
    first, *rest = stages[0]
    h = full_precision(first, x)
    for layer in rest:
        h = layer(h)
    outputs = [h]  # (B, W_0, H/2, W/2)
    for down in stages[1:]:
        h = down(h)
        outputs.append(h)  # (B, W_i, H/2^(i+1), W/2^(i+1))
    return outputs


def up_stages(widths: tuple[int, ...], *, blocks: int, patch: int) -> nn.Sequential:
    """The mirror of `down_stages`, from the coarsest width up: nearest + conv stages, each doubling the resolution.

    With patch = 2 they stop at half resolution (the output conv predicts 2x2 patches); with patch = 1
    a last stage at widths[0] reaches full resolution.
    """
    targets = list(reversed(widths[:-1])) + ([] if patch == 2 else [widths[0]])
    stages, in_ch = [], widths[-1]
    for width in targets:
        stages.append(stage(UpsampleConv(in_ch, width), width, blocks))
        in_ch = width
    return nn.Sequential(*stages)


def output_conv(in_channels: int, channels: int, patch: int) -> nn.Conv2d:
    """The last conv: logits per pixel, or per 2x2 patch for a pixel shuffle that starts as nearest upsampling."""
    out = nn.Conv2d(in_channels, channels * patch**2, 3, padding=1)
    if patch > 1:
        icnr_(out, patch**2)
    return out


def run_output(out: nn.Conv2d, h: torch.Tensor, patch: int) -> torch.Tensor:
    """Logits (B, C, H, W) in float32 from the last feature map."""
    logits = full_precision(out, h)  # (B, C * patch^2, H/patch, W/patch)
    return F.pixel_shuffle(logits, patch) if patch > 1 else logits


def scale_init_(module: nn.Module, factor: float) -> nn.Module:
    """Multiply a layer's initial weights by `factor` and zero its bias, so a residual branch starts near zero.

    A deep stack of residual cells whose branches start small begins as (almost) the identity, which
    keeps the first steps of a hierarchical VAE stable (VDVAE, Child 2021, scales by sqrt(1/depth)).
    """
    with torch.no_grad():
        module.weight.mul_(factor)
        if module.bias is not None:
            module.bias.zero_()
    return module
