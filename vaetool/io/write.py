"""Writing images: formats from extensions, 8 or 16 bits, alpha where the format has it, atomically; grids."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_path, write_file
from ..errors import OutputError
from .png import encode_png

ALPHA_FORMATS = frozenset({"PNG", "TIFF", "WEBP"})
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "PGM": "PPM"}


def normalize_format(name: str) -> str:
    """A PIL format name from a name or extension: "jpg" -> "JPEG", ".tif" -> "TIFF"."""
    upper = name.upper().lstrip(".")
    return _FORMAT_ALIASES.get(upper, upper)


def format_for_path(path: str | os.PathLike) -> str:
    """The PIL format that the path's extension names; OutputError when there is none."""
    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise OutputError(f"{path}: cannot tell an image format from the extension; use .png, .jpg, .tif or .webp")
    return fmt


def supports_alpha(format: str) -> bool:
    """Whether vaetool writes an alpha channel in this format (JPEG, BMP, GIF, PPM: no)."""
    return normalize_format(format) in ALPHA_FORMATS


def can_write_16bit(format: str, channels: int, *, has_alpha: bool = False) -> bool:
    """Whether 16 bits per channel can be written: PIL writes 16-bit grayscale PNG/TIFF, not RGB or alpha."""
    return normalize_format(format) in SIXTEEN_BIT_FORMATS and channels == 1 and not has_alpha


def _to_pil(pixels: torch.Tensor, alpha: torch.Tensor | None, *, sixteen: bool) -> Image.Image:
    """(C, H, W) float in [0, 1] (+ (1, H, W) alpha) -> a PIL image of mode L, LA, RGB, RGBA or I;16."""
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"pixels must be (C, H, W) with C 1 or 3, got {tuple(pixels.shape)}")
    _, height, width = pixels.shape
    x = pixels.detach().to("cpu", torch.float32).nan_to_num(0.0).clamp(0.0, 1.0)
    if sixteen:
        values = (x[0] * 65535.0).round().to(torch.int32).numpy().astype("<u2")  # (H, W)
        return Image.frombytes("I;16", (width, height), values.tobytes())
    planes = [x]
    if alpha is not None:
        alpha = alpha.detach().to("cpu", torch.float32).reshape(-1, *alpha.shape[-2:])
        if alpha.shape != (1, height, width):
            raise ValueError(f"alpha must be (1, {height}, {width}), got {tuple(alpha.shape)}")
        planes.append(alpha.nan_to_num(0.0).clamp(0.0, 1.0))
    u8 = (torch.cat(planes) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # (H, W, K)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[u8.shape[2]]
    return Image.frombytes(mode, (width, height), u8.numpy().tobytes())


# zlib level 1, as OpenCV's imwrite does by default: 3x faster than PIL's default level 6 for files about
# 10% larger. At level 6 the PNG encoder cost a quarter as much CPU as the default model's forward pass.
PNG_COMPRESS_LEVEL = 1


def save_options(fmt: str, *, quality: int = 95) -> dict[str, int]:
    """Keyword arguments for `PIL.Image.save` in format `fmt`: the JPEG/WebP quality, the PNG zlib level."""
    if fmt in ("JPEG", "WEBP"):
        return {"quality": quality}
    return {"compress_level": PNG_COMPRESS_LEVEL} if fmt == "PNG" else {}


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounded to the nearest level (NaN -> 0); any shape."""
    return (pixels.detach().float().nan_to_num(0.0).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def write_image(path: str | os.PathLike, pixels: torch.Tensor, *, alpha: torch.Tensor | None = None,
                bit_depth: int = 8, format: str | None = None, force: bool = False, quality: int = 95,
                durable: bool = True) -> Path:
    """Write (C, H, W) float pixels in [0, 1] atomically; the format comes from the extension by default.

    Alpha is dropped where the format has none (see `supports_alpha`); 16 bits are written only
    where `can_write_16bit` says so, else 8. Refuses to overwrite without `force` (OutputError).
    `durable=False` skips the fsync before the rename: for folders of small images it costs more
    than the rest of the write, and a power cut then leaves at worst an empty file.
    """
    path = Path(path)
    fmt = normalize_format(format) if format else format_for_path(path)
    keep_alpha = alpha is not None and supports_alpha(fmt)
    sixteen = bit_depth == 16 and can_write_16bit(fmt, int(pixels.shape[0]), has_alpha=keep_alpha)
    if fmt == "PNG" and not keep_alpha and not sixteen and pixels.ndim == 3 and pixels.shape[0] in (1, 3):
        data = encode_png(quantize(pixels.detach().cpu()))  # the common case, without PIL's overhead
        with atomic_path(path, force=force, durable=durable) as tmp:
            write_file(tmp, data)
        return path
    image = _to_pil(pixels, alpha if keep_alpha else None, sixteen=sixteen)
    options = save_options(fmt, quality=quality)
    with atomic_path(path, force=force, durable=durable) as tmp:
        try:
            image.save(tmp, format=fmt, **options)
        except OSError as exc:
            if exc.errno is not None:  # the disk's complaint (full, read-only): atomic_path words it
                raise
            raise OutputError(f"{path}: cannot write a {image.mode} image as {fmt} ({exc}); "
                              f"use a .png output") from None
        except (ValueError, KeyError) as exc:
            raise OutputError(f"{path}: cannot write a {image.mode} image as {fmt} ({exc}); "
                              f"use a .png output") from None
    return path


def make_grid(images: torch.Tensor, *, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image, `nrow` images per row."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i in range(n):
        row, col = divmod(i, cols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def save_grid(path: str | os.PathLike, images: torch.Tensor, *, nrow: int, force: bool = False) -> Path:
    """Write (N, C, H, W) float images in [0, 1] as one grid image."""
    return write_image(path, make_grid(images.detach().to("cpu", torch.float32), nrow=nrow), force=force)
