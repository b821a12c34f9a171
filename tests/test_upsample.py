"""The up stages' conv over a nearest-upsampled map, computed at the input's resolution (models/layers.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaetool.models.layers import PHASED_FROM, UpsampleConv, conv_upsampled


def _upsample_then_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def test_equals_upsampling_first_with_its_gradients():
    torch.manual_seed(0)
    for bias in (True, False):
        conv = nn.Conv2d(5, 3, 3, padding=1, bias=bias).double()
        x = torch.randn(2, 5, 7, 4, dtype=torch.float64, requires_grad=True)  # odd and even sides
        expected = _upsample_then_conv(conv, x)
        got = conv_upsampled(conv, x)
        assert got.shape == (2, 3, 14, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        grad = torch.randn_like(expected)
        want = torch.autograd.grad(expected, [x, *conv.parameters()], grad)
        have = torch.autograd.grad(got, [x, *conv.parameters()], grad)
        for w, h in zip(want, have):
            torch.testing.assert_close(h, w, rtol=0, atol=1e-11)


def test_module_keeps_the_checkpoint_names_and_the_layout():
    module = UpsampleConv(4, 6)
    assert sorted(module.state_dict()) == ["1.bias", "1.weight"]
    for side in (PHASED_FROM // 2, PHASED_FROM):  # upsampled first, and at the input's resolution
        x = torch.randn(3, 4, side, side).to(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(module(x), _upsample_then_conv(module[1], x), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        reference = _upsample_then_conv(module[1], x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - reference.float()).abs().max() < 0.05  # bf16 rounding of different sums
