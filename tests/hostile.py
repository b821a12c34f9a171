"""A folder of everything that goes wrong with real image folders, for the reliability tests."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Files that must be skipped, each with a word its warning should contain.
BAD = {
    "empty.png": "empty",
    "text.jpg": "",
    "truncated.png": "",
    "bomb.png": "pixels",
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small PNG whose header declares a huge canvas (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width
    body = zlib.compressobj(9)
    data = b"".join(body.compress(row) for _ in range(8)) + body.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _rgb(size=(24, 20), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_hostile_folder(root: Path) -> dict[str, list[str]]:
    """Write the folder; return {"good": [...], "bad": [...]} relative paths (hidden files in neither)."""
    root.mkdir(parents=True, exist_ok=True)
    good: list[str] = []

    def keep(name: str, image: Image.Image, **save) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **save)
        good.append(name)

    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture\n")
    buffer = io.BytesIO()
    _rgb((64, 64), 1).save(buffer, "PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "bomb.png").write_bytes(bomb_png())
    keep("sixteen.png", Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)))
    keep("palette.png", _rgb(seed=2).convert("P", palette=Image.Palette.ADAPTIVE))
    keep("cmyk.jpg", _rgb(seed=3).convert("CMYK"), quality=90)
    rotated = _rgb((30, 20), 4)
    exif = rotated.getexif()
    exif[0x0112] = 6
    keep("rotated.jpg", rotated, exif=exif.tobytes())
    keep("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    keep("long_thin.png", _rgb((3000, 20), 5))
    alpha = _rgb(seed=6).convert("RGBA")
    alpha.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (20, 1)), "L"))
    keep("partial alpha.png", alpha)
    keep("ünïcödé 名前.png", _rgb(seed=7))
    keep("sub/nested.png", _rgb(seed=8))
    _rgb(seed=9).save(root / ".hidden.png")
    (root / "sub" / ".hidden_dir").mkdir(parents=True, exist_ok=True)
    _rgb(seed=10).save(root / "sub" / ".hidden_dir" / "x.png")
    os.symlink("..", root / "sub" / "loop")  # a symlink loop
    unreadable = root / "locked.png"
    _rgb(seed=11).save(unreadable)
    unreadable.chmod(0)
    bad = list(BAD)
    # Root can read anything: the permission case only counts when the tests run as a normal user.
    (bad if not os.access(unreadable, os.R_OK) else good).append("locked.png")
    return {"good": sorted(good), "bad": sorted(bad)}
