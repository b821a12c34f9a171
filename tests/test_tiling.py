"""Tests for overlapping tiled inference: planning, exact reconstruction and seamless blending."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vaetool.errors import ConfigError
from vaetool.inference.tiling import (
    TilePlan,
    auto_tile,
    blend_tiles,
    blend_window,
    extract_tiles,
    plan_tiles,
    run_tiled,
)


def _image(channels: int, height: int, width: int, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(channels, height, width, generator=gen, dtype=dtype)  # (C, H, W)


def _coverage(plan: TilePlan) -> torch.Tensor:
    """How many tiles cover each pixel of the padded image; also checks bounds."""
    count = torch.zeros(plan.padded_height, plan.padded_width, dtype=torch.int64)
    for top, left in plan.positions:
        assert 0 <= top <= plan.padded_height - plan.tile
        assert 0 <= left <= plan.padded_width - plan.tile
        count[top : top + plan.tile, left : left + plan.tile] += 1
    return count


SIZES = [(1, 1), (7, 300), (16, 16), (35, 35), (16, 17), (15, 16), (1, 40), (64, 9), (100, 37)]


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_reproduces_image(height: int, width: int, dtype: torch.dtype) -> None:
    image = _image(3, height, width, dtype=dtype)
    out = run_tiled(image, lambda x: x, tile=16, overlap=0.25, batch_size=3)
    assert out.shape == image.shape and out.dtype == dtype
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.5, 0.75, 0.95])
def test_identity_for_any_overlap(overlap: float) -> None:
    image = _image(1, 2 * 16 + 3, 50, seed=1)
    out = run_tiled(image, lambda x: x, tile=16, overlap=overlap)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_constant_output_stays_constant() -> None:
    image = _image(3, 41, 77)
    out = run_tiled(image, lambda x: torch.full_like(x, 0.3), tile=16)
    torch.testing.assert_close(out, torch.full_like(image, 0.3), atol=1e-6, rtol=0)


def test_tile_sized_image_is_one_tile_returned_unchanged() -> None:
    plan = plan_tiles(16, 16, tile=16, overlap=0.5)
    assert plan.positions == ((0, 0),)
    assert (plan.padded_height, plan.padded_width) == (16, 16)
    tiles = _image(3, 16, 16, seed=2).unsqueeze(0) * 5 - 1  # (1, C, 16, 16), not the input
    torch.testing.assert_close(blend_tiles(tiles, plan), tiles[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5, math.nan])
def test_overlap_out_of_range_is_config_error(overlap: float) -> None:
    with pytest.raises(ConfigError, match="overlap"):
        plan_tiles(32, 32, tile=16, overlap=overlap)
    with pytest.raises(ConfigError, match="overlap"):
        blend_window(16, overlap)


@pytest.mark.parametrize("tile", [0, -3])
def test_bad_tile_is_config_error(tile: int) -> None:
    with pytest.raises(ConfigError, match="tile"):
        plan_tiles(32, 32, tile=tile)


@pytest.mark.parametrize(("height", "width"), SIZES + [(33, 200)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_positions_cover_every_pixel_in_bounds(height: int, width: int, overlap: float) -> None:
    plan = plan_tiles(height, width, tile=16, overlap=overlap)
    assert plan.padded_height == max(height, 16) and plan.padded_width == max(width, 16)
    assert len(set(plan.positions)) == len(plan.positions)
    assert (_coverage(plan) >= 1).all()


def test_stride_follows_overlap() -> None:
    plan = plan_tiles(16, 64, tile=16, overlap=0.25)
    assert [left for _, left in plan.positions] == [0, 12, 24, 36, 48]
    plan = plan_tiles(16, 50, tile=16, overlap=0.0)
    assert [left for _, left in plan.positions] == [0, 16, 32, 34]  # last snapped to 50 - 16


def test_small_image_is_padded_by_reflection() -> None:
    image = torch.arange(5.0).reshape(1, 1, 5)  # (C, H, W)
    plan = plan_tiles(1, 5, tile=8, overlap=0.0)
    tiles = extract_tiles(image, plan)  # (1, 1, 8, 8)
    assert tiles.shape == (1, 1, 8, 8)
    # height 1 cannot be reflected -> replicated; width reflects 0 1 2 3 4 | 3 2 1
    assert tiles[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1]
    assert (tiles[0, 0] == tiles[0, 0, :1]).all()


def test_extract_tiles_match_slices() -> None:
    image = _image(2, 40, 29, seed=3)
    plan = plan_tiles(40, 29, tile=16, overlap=0.25)
    tiles = extract_tiles(image, plan)
    assert tiles.shape == (len(plan.positions), 2, 16, 16)
    for tile, (top, left) in zip(tiles, plan.positions):
        assert torch.equal(tile, image[:, top : top + 16, left : left + 16])


def test_blend_window_shape_positive_and_tapered() -> None:
    window = blend_window(16, 0.25, dtype=torch.float64)
    assert window.shape == (16, 16) and window.dtype == torch.float64
    assert (window > 0).all()
    assert window[8, 8] == 1.0 and window[0, 0] < 0.01  # flat middle, tapered edges
    torch.testing.assert_close(window, window.T)
    ramp = window[8]
    # neighbours at the planned stride (12) form a partition of unity over the overlap
    torch.testing.assert_close(ramp[12:] + ramp[:4], torch.ones(4, dtype=torch.float64))
    assert torch.equal(blend_window(16, 0.0), torch.ones(16, 16))


def test_bad_tiles_shape_is_rejected() -> None:
    plan = plan_tiles(40, 40, tile=16)
    with pytest.raises(ValueError, match="tiles"):
        blend_tiles(torch.zeros(1, 3, 16, 16), plan)


def test_auto_tile_is_model_size() -> None:
    assert auto_tile(64) == 64
    with pytest.raises(ConfigError):
        auto_tile(0)


def _smooth_image(height: int, width: int, *, seed: int) -> torch.Tensor:
    """A random smooth image (3, H, W): a sum of low-frequency sinusoids, not tied to any grid."""
    gen = torch.Generator().manual_seed(seed)
    freq = torch.rand(3, 12, 2, generator=gen) * 0.3 - 0.15  # cycles per pixel, per channel
    phase = torch.rand(3, 12, 1, 1, generator=gen) * 2 * math.pi
    ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
    arg = 2 * math.pi * (freq[..., 0, None, None] * ys + freq[..., 1, None, None] * xs) + phase
    return 0.5 + torch.sin(arg).sum(1) / (2 * math.sqrt(12))


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur with replicate padding: wrong at tile edges, so naive tiling shows seams."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _seam_ratio(image: torch.Tensor, rows: list[int], cols: list[int]) -> float:
    """Mean |neighbour difference| across the given tile edges over that everywhere else."""
    dx = (image[:, :, 1:] - image[:, :, :-1]).abs()  # dx[..., j] is between columns j and j+1
    dy = (image[:, 1:, :] - image[:, :-1, :]).abs()
    at_x = torch.zeros(dx.shape[-1], dtype=torch.bool)
    at_x[[c - 1 for c in cols]] = True
    at_y = torch.zeros(dy.shape[-2], dtype=torch.bool)
    at_y[[r - 1 for r in rows]] = True
    across = torch.cat([dx[:, :, at_x].flatten(), dy[:, at_y, :].flatten()]).mean()
    inside = torch.cat([dx[:, :, ~at_x].flatten(), dy[:, ~at_y, :].flatten()]).mean()
    return (across / inside).item()


def _tile_edges(plan: TilePlan) -> tuple[list[int], list[int]]:
    """Every row and column where some tile starts or ends, inside the image."""
    t = plan.tile
    rows = {e for top, _ in plan.positions for e in (top, top + t)} - {0, plan.height}
    cols = {e for _, left in plan.positions for e in (left, left + t)} - {0, plan.width}
    return sorted(rows), sorted(cols)


def test_blending_hides_seams_that_naive_tiling_shows() -> None:
    image = _smooth_image(96, 112, seed=0)
    blended = run_tiled(image, _blur, tile=16, overlap=0.25)
    naive = run_tiled(image, _blur, tile=16, overlap=0.0)  # hard cuts at multiples of 16
    rows, cols = _tile_edges(plan_tiles(96, 112, tile=16, overlap=0.25))
    naive_rows, naive_cols = list(range(16, 96, 16)), list(range(16, 112, 16))
    assert _seam_ratio(blended, rows, cols) < 1.1
    assert _seam_ratio(blended, naive_rows, naive_cols) < 1.1
    assert _seam_ratio(naive, naive_rows, naive_cols) > 1.4  # the metric does see a seam
    # and the blended result stays close to running the filter on the whole image
    untiled = _blur(image[None])[0]
    assert (blended - untiled).abs().max() < 0.03 < 0.1 < (naive - untiled).abs().max()


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 200),
    width=st.integers(1, 200),
    tile=st.sampled_from([8, 16, 32]),
    overlap=st.floats(0.0, 0.9, exclude_max=True),
    seed=st.integers(0, 2**16),
)
def test_identity_blend_is_exact_property(
    height: int, width: int, tile: int, overlap: float, seed: int
) -> None:
    plan = plan_tiles(height, width, tile=tile, overlap=overlap)
    assert (_coverage(plan) >= 1).all()
    image = _image(1, height, width, seed=seed)
    out = blend_tiles(extract_tiles(image, plan), plan)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)
