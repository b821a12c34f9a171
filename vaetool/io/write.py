"""Writing images: formats from extensions, 8 or 16 bits, alpha where the format has it, atomically; grids."""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import torch
from PIL import Image

from ..errors import OutputError
from .atomic import atomic_write_bytes
from .png import COMPRESS_LEVEL, encode_png

ALPHA_FORMATS = frozenset({"PNG", "TIFF", "WEBP"})
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "PGM": "PPM"}


def normalize_format(name: str) -> str:
    """A PIL format name from a name or extension: "jpg" -> "JPEG", ".tif" -> "TIFF"."""
    upper = name.upper().lstrip(".")
    return _FORMAT_ALIASES.get(upper, upper)


def format_for_path(path: str | os.PathLike) -> str:
    """The PIL format that the path's extension names; OutputError when there is none."""
    fmt = _format_for_suffix(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: cannot tell an image format from the extension; use .png, .jpg, .tif or .webp")
    return fmt


@functools.lru_cache(maxsize=64)
def _format_for_suffix(suffix: str) -> str | None:
    # Cached: PIL's registry lookup costs more than encoding a small PNG, and it is asked once per file.
    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    return fmt if fmt is not None and fmt in Image.SAVE else None


def supports_alpha(format: str) -> bool:
    """Whether vaetool writes an alpha channel in this format (JPEG, BMP, GIF, PPM: no)."""
    return normalize_format(format) in ALPHA_FORMATS


def can_write_16bit(format: str, channels: int, *, has_alpha: bool = False) -> bool:
    """Whether 16 bits per channel can be written: PIL writes 16-bit grayscale PNG/TIFF, not RGB or alpha."""
    return normalize_format(format) in SIXTEEN_BIT_FORMATS and channels == 1 and not has_alpha


def save_options(fmt: str, *, quality: int = 95) -> dict[str, int]:
    """Keyword arguments for `PIL.Image.save` in format `fmt`: the JPEG/WebP quality, the PNG zlib level."""
    if fmt in ("JPEG", "WEBP"):
        return {"quality": quality}
    return {"compress_level": COMPRESS_LEVEL} if fmt == "PNG" else {}


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounded to the nearest level (NaN -> 0); any shape."""
    return (pixels.detach().float().nan_to_num(0.0).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _as_u8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels if pixels.dtype == torch.uint8 else quantize(pixels)


def _to_pil(pixels: torch.Tensor, alpha: torch.Tensor | None, *, sixteen: bool) -> Image.Image:
    """(C, H, W) pixels (float in [0, 1], or uint8) + (1, H, W) alpha -> a PIL image of mode L, LA, RGB, RGBA or I;16."""
    _, height, width = pixels.shape
    if sixteen:
        x = pixels.detach().to("cpu", torch.float32).nan_to_num(0.0).clamp(0.0, 1.0)
        values = (x[0] * 65535.0).round().to(torch.int32).numpy().astype("<u2")  # (H, W)
        return Image.frombytes("I;16", (width, height), values.tobytes())
    planes = [_as_u8(pixels.detach().cpu())]
    if alpha is not None:
        alpha = alpha.detach().cpu().reshape(-1, *alpha.shape[-2:])
        if alpha.shape != (1, height, width):
            raise ValueError(f"alpha must be (1, {height}, {width}), got {tuple(alpha.shape)}")
        planes.append(_as_u8(alpha))
    u8 = torch.cat(planes).permute(1, 2, 0).contiguous()  # (H, W, K)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[u8.shape[2]]
    return Image.frombytes(mode, (width, height), u8.numpy().tobytes())


def encode_image(pixels: torch.Tensor, fmt: str, *, alpha: torch.Tensor | None = None, sixteen: bool = False,
                 quality: int = 95, name: str | os.PathLike = "image") -> bytes | memoryview:
    """The bytes of a (C, H, W) image (float in [0, 1], or uint8) in PIL format `fmt`; `name` words errors."""
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"pixels must be (C, H, W) with C 1 or 3, got {tuple(pixels.shape)}")
    if fmt == "PNG" and alpha is None and not sixteen:
        return encode_png(_as_u8(pixels.detach().cpu()))  # the common case, without PIL's overhead
    image = _to_pil(pixels, alpha, sixteen=sixteen)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt, **save_options(fmt, quality=quality))
    except (OSError, ValueError, KeyError) as exc:
        raise OutputError(f"{name}: cannot write a {image.mode} image as {fmt} ({exc}); use a .png output") from None
    return buffer.getbuffer()


def write_image(path: str | os.PathLike, pixels: torch.Tensor, *, alpha: torch.Tensor | None = None,
                bit_depth: int = 8, format: str | None = None, force: bool = False, quality: int = 95,
                durable: bool = True) -> Path:
    """Write (C, H, W) pixels (float in [0, 1], or uint8 from `quantize`) atomically; format from the extension.

    Alpha is dropped where the format has none (see `supports_alpha`); 16 bits are written only
    where `can_write_16bit` says so, else 8. Refuses to overwrite without `force` (OutputError).
    `durable=False` skips the fsync before the rename: for folders of small images it costs more
    than the rest of the write, and a power cut then leaves at worst an empty file.
    """
    path = Path(path)
    if not force and os.path.lexists(path):  # before the encoding: a refusal costs nothing
        raise OutputError(f"{path} already exists; pass --force to overwrite it (or --skip-existing to resume)")
    fmt = normalize_format(format) if format else format_for_path(path)
    keep_alpha = alpha is not None and supports_alpha(fmt)
    sixteen = bit_depth == 16 and can_write_16bit(fmt, int(pixels.shape[0]), has_alpha=keep_alpha)
    data = encode_image(pixels, fmt, alpha=alpha if keep_alpha else None, sixteen=sixteen, quality=quality,
                        name=path)
    return atomic_write_bytes(path, data, force=True, durable=durable)


def make_grid(images: torch.Tensor, *, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image, `nrow` images per row (torchvision's layout)."""
    from torchvision.utils import make_grid as tile  # imported here: only grids need torchvision

    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.shape[0] == 0:
        raise ValueError("make_grid needs at least one image")
    if images.shape[0] == 1:  # torchvision returns a lone image unpadded; a grid of one keeps its border
        return torch.nn.functional.pad(images[0], (padding,) * 4, value=pad_value)
    grid = tile(images, nrow=nrow, padding=padding, pad_value=pad_value)
    return grid[:1] if images.shape[1] == 1 else grid  # torchvision makes gray grids RGB; keep them gray


def save_grid(path: str | os.PathLike, images: torch.Tensor, *, nrow: int, force: bool = False) -> Path:
    """Write (N, C, H, W) float images in [0, 1] as one grid image."""
    return write_image(path, make_grid(images.detach().to("cpu", torch.float32), nrow=nrow), force=force)
