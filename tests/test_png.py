"""The fast PNG encoder: every image decodes (with PIL) to exactly the pixels it was given."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vaetool.io.write import quantize, write_image
from vaetool.io.png import encode_png


def decoded(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()  # also checks every chunk's CRC and the zlib stream
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


@settings(max_examples=60, deadline=None)
@given(channels=st.sampled_from([1, 3]), height=st.integers(1, 40), width=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1), smooth=st.booleans())
def test_round_trip_is_exact(channels, height, width, seed, smooth):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (channels, height, width), generator=generator, dtype=torch.uint8)
    if smooth:  # long runs: the compressor's matches, not only literals
        pixels = pixels[:, :1, :1].expand(channels, height, width).clone()
    image = decoded(encode_png(pixels))
    assert image.shape == (height, width, channels)
    np.testing.assert_array_equal(image, pixels.permute(1, 2, 0).numpy())


def test_modes_and_memory_layouts():
    pixels = torch.arange(3 * 5 * 7, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 5, 7)
    channels_last = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]  # as the model's outputs
    for variant in (pixels, channels_last, pixels.flip(-1)):
        assert Image.open(io.BytesIO(encode_png(variant))).mode == "RGB"
        np.testing.assert_array_equal(decoded(encode_png(variant)), variant.permute(1, 2, 0).numpy())
    assert Image.open(io.BytesIO(encode_png(pixels[:1]))).mode == "L"


@pytest.mark.parametrize("bad", [torch.zeros(3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.uint8),
                                 torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(3, 0, 4, dtype=torch.uint8)])
def test_refuses_what_it_cannot_encode(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


def test_write_output_png_and_other_formats(tmp_path):
    pixels = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(0))
    expected = quantize(pixels).permute(1, 2, 0).numpy()
    png = write_image(tmp_path / "sub" / "a.png", pixels, durable=False)  # a new subfolder is made
    np.testing.assert_array_equal(decoded(png.read_bytes()), expected)
    assert (png.stat().st_mode & 0o777) == (0o666 & ~_umask())
    tif = write_image(tmp_path / "a.tif", pixels, durable=False)  # through PIL, lossless too
    np.testing.assert_array_equal(np.asarray(Image.open(tif)), expected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "a.tif", "sub"]  # no temporary files left


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_image_png_fast_path_matches_the_pil_path(tmp_path):
    pixels = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(1))
    pixels[0, 0, 0] = float("nan")  # written as 0, as the PIL path does
    for channels in (1, 3):
        x = pixels[:channels]
        fast = write_image(tmp_path / f"fast{channels}.png", x, durable=False)
        slow = write_image(tmp_path / f"slow{channels}.tif", x)  # TIFF goes through PIL
        np.testing.assert_array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(slow)))
    alpha = write_image(tmp_path / "alpha.png", pixels, alpha=torch.ones(1, 6, 5))  # alpha: PIL's writer
    assert Image.open(alpha).mode == "RGBA"
