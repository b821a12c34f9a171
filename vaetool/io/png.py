"""A small, fast PNG encoder for the streaming commands' 8-bit grayscale and RGB outputs.

PIL's PNG writer spends most of its time in Python around the compressor (plugin lookup, chunk
objects, per-row filter trials); for the thousands of 64x64 images that `sample` or `reconstruct`
write, that cost as much CPU as the model. Here one numpy subtraction applies the PNG "Sub"
filter to every row and zlib (which releases the GIL) compresses them. Other formats, alpha and
16 bits go through PIL (`write.encode_image`).
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
import torch

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type: grayscale, truecolour
SUB_FILTER = 1  # each byte minus the same channel of the pixel to its left (PNG spec, section 9.2)
# zlib level 1, as OpenCV's imwrite uses by default: much faster than level 6 for files about 10% larger.
# Also the level PIL writes PNG at (write.save_options), so both paths make files alike.
COMPRESS_LEVEL = 1
# zlib's run-length strategy (only matches at distance 1, as for filtered rows): faster than the default
# strategy on filtered rows and smaller files too.
STRATEGY = zlib.Z_RLE


def _chunk(tag: bytes, data: bytes | memoryview) -> bytes:
    """One PNG chunk: length, tag, data, CRC-32 of tag and data."""
    crc = zlib.crc32(data, zlib.crc32(tag))
    return b"".join((struct.pack(">I", len(data)), tag, data, struct.pack(">I", crc)))


@functools.lru_cache(maxsize=16)
def _header(width: int, height: int, channels: int) -> bytes:
    """Signature and IHDR: 8 bits per sample, deflate, adaptive filtering, not interlaced."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", ihdr)


_END = _chunk(b"IEND", b"")


def encode_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes for a uint8 (C, H, W) image with C = 1 (grayscale) or 3 (RGB)."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] not in COLOR_TYPES:
        raise ValueError(f"encode_png needs uint8 (1 or 3, H, W) pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    channels, height, width = pixels.shape
    if height == 0 or width == 0:
        raise ValueError("encode_png needs an image of at least 1x1 pixels")
    rows = pixels.permute(1, 2, 0).reshape(height, width * channels).numpy()  # (H, W*C), a copy only if needed
    filtered = np.empty((height, 1 + width * channels), dtype=np.uint8)
    filtered[:, 0] = SUB_FILTER
    filtered[:, 1:1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels:])  # wraps mod 256
    compressor = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 15, 8, STRATEGY)
    data = compressor.compress(filtered) + compressor.flush()
    return b"".join((_header(width, height, channels), _chunk(b"IDAT", data), _END))
