"""Finding, decoding and converting images; writing lives in imagewrite, the decoded training cache in imagecache."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MAX_PIXELS = 89_478_485  # PIL's own default bomb limit: about a 0.25 GB 24-bit image
FITS = ("crop", "pad")
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# A truncated file must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# warnings.catch_warnings swaps process-wide state, so the opens that use it take turns. Only the
# header is parsed under the lock (pure-Python plugin code that holds the GIL anyway); decoding is not.
_OPEN_LOCK = threading.Lock()

Background = tuple[int, int, int] | int


class UnreadableImageError(DataError):
    """One image file that cannot be decoded; `reason` is the message without the path."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class FoundImage:
    """An image file and its path relative to the input it was found under (used to mirror trees)."""

    path: Path
    relative: Path


@dataclass
class DecodedImage:
    """An image at its native resolution, for denoising and writing back."""

    pixels: torch.Tensor  # (C, H, W) float32 in [0, 1]; C is 1 or 3
    alpha: torch.Tensor | None  # (1, H, W) float32 in [0, 1]
    bit_depth: int  # 8 or 16
    format: str | None  # PIL format name of the source, e.g. "PNG"


# ----------------------------------------------------------------------------------------- finding


def find_images(inputs: Sequence[str | os.PathLike], *, stdin: TextIO | None = None,
                on_warning: Callable[[str], None] | None = None) -> list[FoundImage]:
    """Expand files, folders (recursive, sorted, hidden entries skipped) and `-` (paths on stdin).

    Files named directly are always taken; folders contribute files with an image extension.
    With several folders, each one's relative paths start with the folder's name, so output
    trees mirrored from them cannot collide.
    """
    warn = on_warning or (lambda message: None)
    expanded: list[Path] = []
    for item in inputs:
        if str(item) == "-":
            expanded.extend(Path(line.rstrip("\r\n")) for line in (stdin or sys.stdin) if line.rstrip("\r\n"))
        else:
            expanded.append(Path(item))
    folders = [p for p in expanded if p.is_dir()]
    prefixes = _folder_prefixes(folders) if len(folders) > 1 else {}
    found: list[FoundImage] = []
    seen: set[object] = set()
    for path in expanded:
        if path.is_dir():
            batch = [FoundImage(f, prefixes.get(path, Path()) / rel) for f, rel in _walk(path, warn)]
        elif path.exists() or path.is_symlink():
            batch = [FoundImage(path, Path(path.name))]
        else:
            raise DataError(f"{path} does not exist; check the path")
        for image in batch:
            key = _file_key(image.path)
            if key not in seen:  # the same file named twice is processed once
                seen.add(key)
                found.append(image)
    if not found:
        names = ", ".join(str(p) for p in expanded) or "standard input"
        raise DataError(f"no images found in {names}; image files end in "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    return _unique_relatives(found)


def _file_key(path: Path) -> object:
    """Identity of a file, so one file reached by two names is processed once."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return os.path.realpath(path)


def _walk(root: Path, warn: Callable[[str], None]) -> list[tuple[Path, Path]]:
    """(file, relative path) for every non-hidden image file under `root`, sorted."""
    visited: set[tuple[int, int]] = set()
    out: list[tuple[Path, Path]] = []

    def onerror(exc: OSError) -> None:
        warn(f"{exc.filename}: cannot read folder ({exc.strerror or exc}); skipped")

    for folder, dirs, files in os.walk(root, onerror=onerror, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a second link to a folder
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            full = Path(folder) / name
            if name.startswith(".") or full.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if not full.is_file():
                warn(f"{full}: broken link or not a regular file; skipped")
                continue
            out.append((full, full.relative_to(root)))
    out.sort(key=lambda pair: pair[1].parts)
    return out


def _folder_prefixes(folders: list[Path]) -> dict[Path, Path]:
    """A distinct leading folder name for each input folder ("data", "data-2", ...)."""
    prefixes: dict[Path, Path] = {}
    used: set[str] = set()
    for folder in folders:
        base = Path(os.path.abspath(folder)).name or "root"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        prefixes.setdefault(folder, Path(name))
    return prefixes


def _unique_relatives(found: list[FoundImage]) -> list[FoundImage]:
    """Rename colliding relative paths (two files named `x.png` given directly) to `x-2.png`, ..."""
    used: set[str] = set()
    out = []
    for image in found:
        rel, k = image.relative, 1
        while str(rel) in used:
            k += 1
            rel = image.relative.with_name(f"{image.relative.stem}-{k}{image.relative.suffix}")
        used.add(str(rel))
        out.append(image if rel == image.relative else FoundImage(image.path, rel))
    return out


# ---------------------------------------------------------------------------------------- decoding


def _open_checked(path: Path, *, max_pixels: int) -> Image.Image:
    """Open an image's header and check it before any pixel is decoded; caller closes it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnreadableImageError(path, "does not exist; check the path") from None
    except OSError as exc:
        raise UnreadableImageError(path, f"cannot read ({exc.strerror or exc}); check its permissions") from None
    if os.path.isdir(path):
        raise UnreadableImageError(path, "is a folder, not an image; pass image files or folders")
    if st.st_size == 0:
        raise UnreadableImageError(path, "empty file; remove it or replace it with the full image")
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)  # PIL owns the file handle and closes it with the image
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not an image PIL can read (wrong extension or damaged file); "
                                         "remove it or convert it to PNG") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UnreadableImageError(path, _bomb_reason(max_pixels)) from None
    except PermissionError as exc:
        raise UnreadableImageError(path, f"cannot read ({exc.strerror}); check its permissions") from None
    except OSError as exc:
        if exc.errno is not None:  # a system error, not a parser's complaint
            raise UnreadableImageError(path, f"cannot read ({exc.strerror or exc})") from None
        raise UnreadableImageError(path, f"damaged image header ({exc}); re-export or remove it") from None
    except Exception as exc:  # plugins raise anything on malformed headers
        raise UnreadableImageError(path, f"damaged image header ({exc}); re-export or remove it") from None
    _check_size(path, image, max_pixels)
    return image


def _bomb_reason(max_pixels: int) -> str:
    return (f"image is too large (over {max_pixels:,} pixels; possibly a decompression bomb); "
            f"downscale it or remove it")


def _check_size(path: Path, image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise UnreadableImageError(path, f"image has zero size ({width}x{height}); remove it")
    if width * height > max_pixels:
        image.close()
        raise UnreadableImageError(path, f"{width}x{height} " + _bomb_reason(max_pixels))


def _decode(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS,
            draft: Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> Image.Image:
    """Fully decode an image with EXIF orientation applied; `draft` lets JPEG decode at reduced scale."""
    path = Path(path)
    image = _open_checked(path, max_pixels=max_pixels)
    try:
        with image:
            if draft is not None and image.format == "JPEG":
                image.draft(None, draft(image.size))  # DCT-domain downscale: much faster on big photos
            image.load()  # forces the full decode so truncation is caught here
            fmt = image.format
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # a malformed EXIF block should not cost the pixels
                image = image.copy()
    except UnreadableImageError:
        raise
    except Exception as exc:
        raise UnreadableImageError(path, f"truncated or damaged image ({exc}); re-export or remove it") from None
    image.format = fmt  # exif_transpose returns a new image without it
    return image


def _scale_sixteen_bit(image: Image.Image) -> np.ndarray:
    """16-bit (and "I") gray -> float32 in [0, 1], taking the full 16-bit range as white."""
    values = np.asarray(image).astype(np.float32)
    return np.clip(values / 65535.0, 0.0, 1.0)


def _scale_float(image: Image.Image) -> np.ndarray:
    """"F" gray -> float32 in [0, 1]: data already in [0, 1] is kept, else read on PIL's 0..255 scale."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return values
    return np.clip(values / 255.0, 0.0, 1.0)


def _to_uint8_gray(values: np.ndarray) -> Image.Image:
    array = np.round(values * 255.0).astype(np.uint8)  # (H, W)
    return Image.frombytes("L", (array.shape[1], array.shape[0]), array.tobytes())


def _normalize_mode(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Any PIL mode -> one of L, LA, RGB, RGBA (8 bits per channel)."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in SIXTEEN_BIT_MODES:
        return _to_uint8_gray(_scale_sixteen_bit(image))  # scale, not clip: 65535 -> 255
    if mode == "F":
        return _to_uint8_gray(_scale_float(image))
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode == "La":  # premultiplied; PIL converts it only to LA
        return image.convert("LA")
    try:  # PA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, ...; note LAB's "A" band is not alpha
        return image.convert("RGBA" if mode.endswith(("A", "a")) else "RGB")
    except ValueError as exc:
        raise UnreadableImageError(path, f"unsupported colour mode {mode} ({exc}); convert it to RGB") from None


def _background(background: Background) -> tuple[int, int, int]:
    if isinstance(background, int):
        return (background, background, background)
    r, g, b = (int(v) for v in background)
    return (r, g, b)


def _luma(color: tuple[int, int, int]) -> int:
    # ITU-R 601-2 luma, the same weights PIL uses for RGB -> "L".
    r, g, b = color
    return (r * 299 + g * 587 + b * 114 + 500) // 1000


def _flatten(image: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """Composite any alpha on `background`, then give the image 1 (L) or 3 (RGB) channels."""
    if image.mode in ("LA", "RGBA"):
        canvas = Image.new("RGBA", image.size, (*background, 255))
        image = Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)  # convert() copies even to the same mode


def _draft_size(image_size: int, fit: str) -> Callable[[tuple[int, int]], tuple[int, int]]:
    def size(native: tuple[int, int]) -> tuple[int, int]:
        w, h = native
        side = min(w, h) if fit == "crop" else max(w, h)
        k = min(1.0, 2.0 * image_size / side)  # keep 2x headroom so Lanczos still sees detail
        return (max(1, int(w * k + 0.999)), max(1, int(h * k + 0.999)))
    return size


def _fit(image: Image.Image, image_size: int, fit: str, background: tuple[int, int, int]) -> Image.Image:
    """Crop: shorter side to `image_size`, centre crop. Pad: longer side, centred on `background`."""
    w, h = image.size
    if w == h == image_size:  # already the size: nothing to resample (resize() would copy)
        return image
    if fit == "crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return image.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    scale = image_size / max(w, h)
    nw, nh = max(1, min(image_size, round(w * scale))), max(1, min(image_size, round(h * scale)))
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    fill = _luma(background) if image.mode == "L" else background
    canvas = Image.new(image.mode, (image_size, image_size), fill)
    canvas.paste(resized, ((image_size - nw) // 2, (image_size - nh) // 2))
    return canvas


def _check_options(image_size: int, channels: int, fit: str) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, not {channels}")
    if fit not in FITS:
        raise ConfigError(f"fit must be one of {', '.join(FITS)}, not {fit!r}")
    if image_size < 1:
        raise ConfigError(f"image size must be at least 1, not {image_size}")


def load_image(path: str | os.PathLike, *, image_size: int, channels: int, background: Background = (255, 255, 255),
               fit: str = "crop", max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decode one image to a uint8 tensor (channels, image_size, image_size) for training or inference.

    EXIF orientation is applied, every PIL mode is converted (16-bit scaled to 8 bits, alpha
    composited on `background`), grayscale uses ITU luma. Raises DataError naming the file.
    """
    _check_options(image_size, channels, fit)
    color = _background(background)
    image = _decode(path, max_pixels=max_pixels, draft=_draft_size(image_size, fit))
    image = _fit(_flatten(_normalize_mode(image, path), channels, color), image_size, fit, color)
    array = np.array(image, dtype=np.uint8)  # (S, S) or (S, S, 3)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if array.ndim == 2 else tensor.permute(2, 0, 1).contiguous()  # (C, S, S)


def _is_gray(path: Path, max_pixels: int) -> bool | None:
    """Whether an image is grayscale, from its header (palette images are decoded); None if unreadable."""
    try:
        image = _open_checked(path, max_pixels=max_pixels)
    except DataError:
        return None
    try:
        with image:
            if image.mode in GRAY_MODES:
                return True
            if image.mode not in ("P", "PA"):
                return False
            image.load()
            used = [i for i, count in enumerate(image.histogram()[:256]) if count]
            palette = image.getpalette("RGB") or []
            return all(palette[3 * i] == palette[3 * i + 1] == palette[3 * i + 2]
                       for i in used if 3 * i + 2 < len(palette))
    except Exception:
        return None


def detect_channels(paths: Sequence[str | os.PathLike], *, workers: int | None = None,
                    max_pixels: int = MAX_PIXELS) -> int:
    """1 if every readable image is grayscale (by mode, or a palette of grays), else 3."""
    from .cache import ordered_map

    readable = 0
    workers = workers or default_workers()
    check = lambda path: _is_gray(Path(path), max_pixels)  # noqa: E731
    with contextlib.closing(ordered_map(check, paths, workers=workers, window=4 * workers)) as results:
        for _, future in results:
            gray = future.result()
            if gray is False:
                return 3
            readable += gray is True  # unreadable files are left to the decoder to report
    return 1 if readable else 3


def default_workers() -> int:
    """Threads for decoding: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def read_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode an image at native resolution: grayscale stays 1 channel, palettes become RGB(A).

    16-bit grayscale keeps its precision (bit_depth 16); alpha, when the file has one, is returned
    separately. Raises DataError naming the file, like `load_image`.
    """
    image = _decode(path, max_pixels=max_pixels)
    fmt = image.format
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = _scale_sixteen_bit(image) if image.mode != "F" else _scale_float(image)
        return DecodedImage(torch.from_numpy(np.ascontiguousarray(values))[None], None, 16, fmt)  # (1, H, W)
    image = _normalize_mode(image, path)  # L, LA, RGB or RGBA
    array = np.asarray(image, dtype=np.float32) / 255.0
    planes = torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)  # (K, H, W)
    has_alpha = image.mode in ("LA", "RGBA")
    pixels = planes[:-1] if has_alpha else planes
    alpha = planes[-1:].contiguous() if has_alpha else None
    return DecodedImage(pixels.contiguous(), alpha, 8, fmt)


# ----------------------------------------------------------------------------------------- writing


def to_float(batch_uint8: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on `device`; moved as uint8 first, so the copy is 4x smaller."""
    if batch_uint8.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {batch_uint8.dtype}")
    x = batch_uint8 if device is None else batch_uint8.to(device, non_blocking=True)
    return x.to(torch.float32).div_(255.0)


# Writing, and the cache and streaming, live in their own modules; they are part of this module's API.
from .cache import ImageCache, build_cache, iter_batches  # noqa: E402
from .write import (can_write_16bit, format_for_path, make_grid, normalize_format, save_grid,  # noqa: E402
                         save_options, supports_alpha, write_image)

__all__ = [
    "IMAGE_EXTENSIONS", "MAX_PIXELS", "FoundImage", "DecodedImage", "ImageCache", "UnreadableImageError",
    "find_images", "load_image", "detect_channels", "read_image", "write_image", "supports_alpha",
    "can_write_16bit", "save_options", "format_for_path", "normalize_format", "make_grid", "save_grid", "build_cache",
    "iter_batches", "to_float", "default_workers",
]
