"""Decoding and converting images: every PIL mode, EXIF, sizes, broken files, gray detection, to_float."""

from __future__ import annotations

import builtins
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from imagefiles import found_list, noise, palette_image, patch_ihdr, png_bytes, save, uniform_16bit
from vaetool.errors import ConfigError, DataError
from vaetool.io.batches import iter_batches
from vaetool.io.cache import build_cache
from vaetool.io.decode import detect_channels, load_image, match_channels, read_image, to_float, to_gray


# ------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_to_the_expected_values(tmp_path: Path, channels: int) -> None:
    cases = {  # name -> (image, expected RGB after compositing on the blue background)
        "one.png": (Image.new("1", (8, 8), 1), (255, 255, 255)),
        "gray.png": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "gray_alpha.png": (Image.new("LA", (8, 8), (0, 0)), (0, 0, 255)),
        "rgb.png": (Image.new("RGB", (8, 8), (10, 200, 30)), (10, 200, 30)),
        "rgba.png": (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (128, 0, 127)),
        "palette.png": (palette_image((200, 20, 40)), (200, 20, 40)),
        "sixteen_white.png": (uniform_16bit(65535), (255, 255, 255)),
        "sixteen_half.png": (uniform_16bit(32768), (128, 128, 128)),
        "float.tif": (Image.new("F", (8, 8), 0.5), (128, 128, 128)),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    }
    transparent = Image.new("P", (8, 8), 0)
    transparent.putpalette([255, 0, 0] * 256)
    transparent.info["transparency"] = 0
    cases["palette_transparent.png"] = (transparent, (0, 0, 255))
    for name, (image, rgb) in cases.items():
        path = save(image, tmp_path / name, **({"transparency": 0} if "transparent" in name else {}))
        out = load_image(path, image_size=4, channels=channels, background=(0, 0, 255))
        assert out.dtype == torch.uint8 and out.shape == (channels, 4, 4), name
        expected = torch.tensor(rgb if channels == 3 else [round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])])
        tolerance = 6 if name.endswith(".jpg") else 1
        assert (out.float().mean((1, 2)) - expected).abs().max() <= tolerance, (name, out[:, 0, 0], expected)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    white = load_image(save(uniform_16bit(65535), tmp_path / "w.png"), image_size=8, channels=1)
    half = load_image(save(uniform_16bit(32768), tmp_path / "h.png"), image_size=8, channels=1)
    dark = load_image(save(uniform_16bit(1000), tmp_path / "d.png"), image_size=8, channels=1)
    assert torch.all(white == 255)
    assert torch.all((half.int() - 128).abs() <= 1)
    assert torch.all(dark == 4)  # 1000 / 257 -> 4: clipping would have given 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, 10:] = 255  # left half black, right half white, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    decoded = read_image(path)
    assert decoded.pixels.shape == (3, 20, 10)  # portrait once rotated
    assert decoded.pixels[:, :8].mean() < 0.1 and decoded.pixels[:, 12:].mean() > 0.9  # black went to the top
    loaded = load_image(path, image_size=10, channels=1, fit="pad")
    assert loaded[0, :4, 3:7].float().mean() < 30 and loaded[0, 6:, 3:7].float().mean() > 225


@pytest.mark.parametrize("size", [(1, 1), (3000, 20), (20, 3000)])
@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_extreme_sizes(tmp_path: Path, size: tuple[int, int], fit: str) -> None:
    path = save(Image.new("RGB", size, (0, 0, 0)), tmp_path / "odd.png")
    out = load_image(path, image_size=16, channels=3, fit=fit)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    if fit == "crop" or size == (1, 1):
        assert torch.all(out == 0)  # the image fills the square
    else:
        assert out.float().mean() > 200  # a thin line of black on a white background


def test_crop_and_pad_differ_as_documented(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)  # red only in the left fifth
    pixels[:, 8:] = (0, 255, 0)
    path = save(Image.fromarray(pixels), tmp_path / "wide.png")
    crop = load_image(path, image_size=10, channels=3, fit="crop")
    pad = load_image(path, image_size=10, channels=3, fit="pad", background=(0, 0, 255))
    assert crop[0].max() < 40 and crop[1].min() > 200  # centre crop: only green
    assert pad[0, 4, 0] > 200  # red kept at the left
    assert torch.equal(pad[:, 0, 5], torch.tensor([0, 0, 255], dtype=torch.uint8))  # padding rows
    assert torch.equal(pad[:, 9, 5], torch.tensor([0, 0, 255], dtype=torch.uint8))


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    path = save(Image.new("L", (4, 4)), tmp_path / "x.png")
    with pytest.raises(ConfigError):
        load_image(path, image_size=8, channels=2)
    with pytest.raises(ConfigError):
        load_image(path, image_size=8, channels=3, fit="stretch")
    with pytest.raises(ConfigError):  # at the call, before any batch is taken
        iter_batches(found_list([path]), image_size=8, channels=1, batch_size=0)
    with pytest.raises(ConfigError):
        build_cache(found_list([path]), image_size=0, channels=1)


# ----------------------------------------------------------------------------------- broken files


def _truncated_png(path: Path) -> Path:
    data = png_bytes(Image.fromarray(noise(64, 64)))
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    return path


def _writer(data: bytes | str):
    def write(path: Path) -> Path:
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path
    return write


def _declared(width: int, height: int) -> bytes:
    """A tiny real PNG whose header claims another size."""
    return patch_ihdr(png_bytes(Image.new("L", (4, 4))), width, height)


BROKEN = {
    "empty.png": (_writer(b""), "empty"),
    "text.jpg": (_writer("this is not an image\n"), "not an image"),
    "truncated.png": (_truncated_png, "truncated"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "bomb.png": (_writer(_declared(30000, 30000)), "too large"),
    "warning_bomb.png": (_writer(_declared(10000, 9000)), "too large"),
    "zero.png": (_writer(_declared(0, 4)), ""),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("reader", ["load", "read"])
def test_broken_files_raise_data_error_naming_the_file(tmp_path: Path, name: str, reader: str) -> None:
    make, words = BROKEN[name]
    path = make(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bomb must be refused, not warned about
        with pytest.raises(DataError) as info:
            if reader == "load":
                load_image(path, image_size=8, channels=3)
            else:
                read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message
    assert "\n" not in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = save(Image.new("L", (100, 100)), tmp_path / "big.png")
    with pytest.raises(DataError, match="too large"):
        load_image(path, image_size=8, channels=1, max_pixels=5000)
    assert load_image(path, image_size=8, channels=1, max_pixels=10_000).shape == (1, 8, 8)


def test_unreadable_file_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(Image.new("L", (4, 4)), tmp_path / "locked.png")
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(DataError, match="permission"):
        load_image(path, image_size=4, channels=1)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------------------- channels


def test_detect_channels(tmp_path: Path) -> None:
    gray_palette = palette_image((90, 90, 90))
    grays = [
        save(Image.new("L", (4, 4)), tmp_path / "l.png"),
        save(Image.new("1", (4, 4)), tmp_path / "one.png"),
        save(Image.new("LA", (4, 4)), tmp_path / "la.png"),
        save(uniform_16bit(300), tmp_path / "sixteen.png"),
        save(gray_palette, tmp_path / "gray_palette.png"),
    ]
    broken = tmp_path / "broken.png"
    broken.write_text("nope")
    assert detect_channels(grays + [broken]) == 1
    assert detect_channels(grays + [save(Image.new("RGB", (4, 4)), tmp_path / "rgb.png")]) == 3
    color_palette = palette_image((200, 0, 0))
    assert detect_channels(grays + [save(color_palette, tmp_path / "color_palette.png")]) == 3


def test_read_image_modes(tmp_path: Path) -> None:
    gray = read_image(save(Image.new("L", (3, 2), 51), tmp_path / "g.png"))
    assert gray.pixels.shape == (1, 2, 3) and torch.allclose(gray.pixels, torch.full((1, 2, 3), 0.2))
    palette = read_image(save(palette_image((255, 0, 0), 2), tmp_path / "p.png"))
    assert palette.pixels.shape == (3, 2, 2) and palette.alpha is None
    assert torch.equal(palette.pixels[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    la = read_image(save(Image.new("LA", (3, 2), (10, 255)), tmp_path / "la.png"))
    assert la.pixels.shape == (1, 2, 3) and torch.all(la.alpha == 1.0)



def test_to_float() -> None:
    batch = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = to_float(batch, "cpu")
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([0.0, 128 / 255, 1.0]).view(1, 1, 1, 3))
    with pytest.raises(ValueError):
        to_float(out)


# ---------------------------------------------------------------------------------------- property

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": "<u2", "I": "<i4", "F": "<f4"}[mode]
        values = rng.uniform(0, 70000 if mode == "I" else 65535, size=(height, width)).astype(dtype)
        return Image.frombytes(mode, (width, height), values.tobytes())
    bands = len(Image.new(mode if mode != "P" else "L", (1, 1)).getbands())
    if mode == "P":
        return Image.fromarray(noise(height, width, seed=seed)).quantize(16)
    data = rng.integers(0, 256, size=(height, width, bands), dtype=np.uint8)
    image = Image.frombytes("L" if mode == "1" else mode, (width, height), data.tobytes())
    return image.convert("1") if mode == "1" else image


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), width=st.integers(1, 80), height=st.integers(1, 80),
       channels=st.sampled_from([1, 3]), size=st.sampled_from([8, 16]), fit=st.sampled_from(["crop", "pad"]),
       seed=st.integers(0, 2**16))
def test_any_mode_and_size_converts_to_the_requested_shape(tmp_path: Path, mode: str, width: int, height: int,
                                                            channels: int, size: int, fit: str, seed: int) -> None:
    suffix = ".tif" if mode in ("I", "F", "CMYK") else ".png"
    path = tmp_path / f"random_{mode.replace(';', '_')}{suffix}"
    _random_image(mode, width, height, seed).save(path)
    out = load_image(path, image_size=size, channels=channels, fit=fit)
    assert out.dtype == torch.uint8 and out.shape == (channels, size, size)
    decoded = read_image(path)
    assert decoded.pixels.shape[1:] == (height, width) and decoded.pixels.shape[0] in (1, 3)
    assert 0.0 <= decoded.pixels.min() and decoded.pixels.max() <= 1.0


def test_gray_conversion_matches_pil_and_round_trips_channels() -> None:
    rgb = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pil_gray = np.asarray(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("L"), dtype=np.float32)
    ours = to_gray(rgb.float())[0].numpy()  # (H, W), not rounded
    assert np.abs(ours - pil_gray).max() <= 0.5 + 1e-4  # PIL rounds the same weighted sum
    gray = torch.rand(2, 1, 4, 4)
    assert torch.equal(match_channels(gray, 3), gray.expand(2, 3, 4, 4))
    assert torch.allclose(match_channels(gray.expand(2, 3, 4, 4), 1), gray, atol=1e-6)  # the weights sum to 1
    assert match_channels(gray, 1) is gray
