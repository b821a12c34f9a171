"""Writing images: exact PNG round trips, 16 bits, alpha, refusals, formats, grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetool.errors import OutputError
from vaetool.io.decode import read_image
from vaetool.io.write import can_write_16bit, make_grid, quantize, save_grid, supports_alpha, write_image


# ---------------------------------------------------------------------------------------- writing


def _random_pixels(channels: int, height: int, width: int, levels: int = 255) -> torch.Tensor:
    gen = torch.Generator().manual_seed(channels * 1000 + height)
    return torch.randint(0, levels + 1, (channels, height, width), generator=gen).float() / levels


def test_write_png_round_trip_is_exact(tmp_path: Path) -> None:
    for channels in (1, 3):
        pixels = _random_pixels(channels, 9, 7)
        path = write_image(tmp_path / f"out{channels}.png", pixels)
        back = read_image(path)
        assert back.format == "PNG" and back.bit_depth == 8 and back.alpha is None
        assert torch.equal(back.pixels, pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out1.png", "out3.png"]  # no temporary left


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_write_sixteen_bit_gray(tmp_path: Path, suffix: str) -> None:
    pixels = _random_pixels(1, 6, 5, levels=65535)
    path = write_image(tmp_path / f"deep{suffix}", pixels, bit_depth=16)
    back = read_image(path)
    assert back.bit_depth == 16 and torch.equal(back.pixels, pixels)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I;16")


def test_sixteen_bit_rgb_falls_back_to_eight(tmp_path: Path) -> None:
    assert can_write_16bit("png", 1) and can_write_16bit("TIFF", 1)
    assert not can_write_16bit("PNG", 3) and not can_write_16bit("JPEG", 1)
    assert not can_write_16bit("PNG", 1, has_alpha=True)
    path = write_image(tmp_path / "rgb.png", _random_pixels(3, 4, 4), bit_depth=16)
    assert read_image(path).bit_depth == 8


def test_write_jpeg_drops_alpha(tmp_path: Path) -> None:
    assert not supports_alpha("jpg") and supports_alpha("png") and supports_alpha("WEBP")
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    pixels = torch.stack([yy, xx, (yy + xx) / 2])  # (3, 16, 16), smooth so JPEG keeps it
    path = write_image(tmp_path / "photo.jpg", pixels, alpha=torch.full((1, 16, 16), 0.5))
    back = read_image(path)
    assert back.format == "JPEG" and back.alpha is None
    with Image.open(path) as stored:
        assert stored.mode == "RGB"
    assert (back.pixels - pixels).abs().mean() < 0.02


def test_alpha_round_trip_on_png(tmp_path: Path) -> None:
    for channels in (1, 3):
        pixels, alpha = _random_pixels(channels, 5, 6), _random_pixels(1, 5, 6)
        back = read_image(write_image(tmp_path / f"alpha{channels}.png", pixels, alpha=alpha))
        assert back.alpha is not None and torch.equal(back.alpha, alpha) and torch.equal(back.pixels, pixels)


def test_write_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = write_image(tmp_path / "x.png", torch.zeros(1, 4, 4))
    with pytest.raises(OutputError, match="already exists"):
        write_image(path, torch.ones(1, 4, 4))
    assert torch.all(read_image(path).pixels == 0)
    write_image(path, torch.ones(1, 4, 4), force=True)
    assert torch.all(read_image(path).pixels == 1)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_write_clamps_and_checks_format(tmp_path: Path) -> None:
    path = write_image(tmp_path / "clamped.png", torch.tensor([[[-1.0, 2.0, float("nan")]]]))
    assert read_image(path).pixels.flatten().tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(OutputError, match="extension"):
        write_image(tmp_path / "out.xyz", torch.zeros(1, 2, 2))
    explicit = write_image(tmp_path / "named.bin", torch.zeros(3, 2, 2), format="png")
    with Image.open(explicit) as stored:
        assert stored.format == "PNG"


def test_make_grid_and_save_grid(tmp_path: Path) -> None:
    tiles = torch.stack([torch.full((1, 4, 4), i / 10) for i in range(5)])  # (5, 1, 4, 4)
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (1, 14, 20)
    assert torch.all(grid[:, 2:6, 8:12] == 0.1) and torch.all(grid[:, 8:12, 8:12] == 0.4)
    assert torch.all(grid[:, 8:12, 14:18] == 1.0) and torch.all(grid[:, 0, :] == 1.0)  # empty cell is padding
    path = save_grid(tmp_path / "grid.png", tiles, nrow=3)
    assert read_image(path).pixels.shape == (1, 14, 20)


def _grid_by_hand(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """The layout vaetool drew its grids with before it used torchvision's: the pictures must not change."""
    n, c, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i in range(n):
        row, col = divmod(i, cols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


@pytest.mark.parametrize("shape", [(5, 1, 4, 4), (7, 3, 3, 5), (1, 3, 2, 2), (64, 1, 16, 16)])
def test_make_grid_is_the_same_picture_as_before(shape: tuple[int, int, int, int]) -> None:
    images = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    for nrow in (1, 3, 8, 100):
        assert torch.equal(make_grid(images, nrow=nrow), _grid_by_hand(images, nrow))


def test_uint8_pixels_and_not_durable_writes_match_float_ones(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    rgb, gray = torch.rand(3, 8, 8, generator=g), torch.rand(1, 8, 8, generator=g)
    for pixels, name in ((rgb, "c.png"), (gray, "g.png"), (rgb, "c.jpg")):
        write_image(tmp_path / "fast" / name, quantize(pixels), durable=False)
        write_image(tmp_path / "ref" / name, pixels)
        fast, ref = Image.open(tmp_path / "fast" / name), Image.open(tmp_path / "ref" / name)
        assert fast.mode == ref.mode and np.array_equal(np.asarray(fast), np.asarray(ref)), name
    with pytest.raises(OutputError, match="already exists"):
        write_image(tmp_path / "fast" / "c.png", rgb)
    with pytest.raises(OutputError, match="extension"):
        write_image(tmp_path / "fast" / "c.xyz", rgb)
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == ["c.jpg", "c.png", "g.png"]  # no temporaries
