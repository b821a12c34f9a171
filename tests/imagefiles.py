"""Image files for the io tests: noise, palettes, 16-bit and broken files, and FoundImage lists."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vaetool.io.find import FoundImage


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def uniform_16bit(value: int, size: int = 8) -> Image.Image:
    data = np.full((size, size), value, dtype="<u2")
    return Image.frombytes("I;16", (size, size), data.tobytes())


def patch_ihdr(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's declared size, with a correct CRC, leaving the pixel data alone."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return png[:16] + body + crc + png[33:]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def palette_image(color: tuple[int, int, int], size: int = 8) -> Image.Image:
    image = Image.new("P", (size, size), 3)
    image.putpalette([0, 0, 0] * 3 + list(color) + [255, 255, 255] * 252)
    return image


def good_set(folder: Path, count: int = 4) -> list[Path]:
    paths = []
    for i in range(count):
        paths.append(save(Image.fromarray(noise(12 + i, 10, seed=i)), folder / f"good_{i}.png"))
    return paths


def found_list(paths: list[Path]) -> list[FoundImage]:
    return [FoundImage(p, Path(p.name)) for p in paths]


def bad_file(folder: Path) -> Path:
    path = folder / "bad.png"
    path.write_text("not a png")
    return path
