"""Opening, decoding and converting images: every PIL mode to uint8 or float tensors, gray <-> RGB, luma."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, DataError
from .pool import default_workers, ordered_map

MAX_PIXELS = 89_478_485  # PIL's own default bomb limit: about a 0.25 GB 24-bit image
# crop: the shorter side resized to the image size, centre crop; pad: the longer side, padded; patches: no
# resizing, the image cut into tiles of the size at its own resolution (`load_patches`).
FITS = ("crop", "pad", "patches")
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# ITU-R 601-2 luma in thousandths, the weights PIL uses for RGB -> "L": files and tensors turn gray alike.
LUMA_PERMILLE = (299, 587, 114)
LUMA = tuple(w / 1000 for w in LUMA_PERMILLE)

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


def failure_reason(exc: DataError) -> str:
    """Why a file could not be used, without its path when the error keeps the two apart."""
    return getattr(exc, "reason", None) or str(exc)


@dataclass
class DecodedImage:
    """An image at its native resolution, for denoising and writing back."""

    pixels: torch.Tensor  # (C, H, W) float32 in [0, 1]; C is 1 or 3
    alpha: torch.Tensor | None  # (1, H, W) float32 in [0, 1]
    bit_depth: int  # 8 or 16
    format: str | None  # PIL format name of the source, e.g. "PNG"


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
    """The gray level PIL gives an RGB colour (rounded integer luma)."""
    return (sum(c * w for c, w in zip(color, LUMA_PERMILLE)) + 500) // 1000


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
    if fit == "patches":
        raise ConfigError("load_image gives one image; load_patches cuts the tiles of the patches fit")
    color = _background(background)
    image = _decode(path, max_pixels=max_pixels, draft=_draft_size(image_size, fit))
    image = _fit(_flatten(_normalize_mode(image, path), channels, color), image_size, fit, color)
    array = np.array(image, dtype=np.uint8)  # (S, S) or (S, S, 3)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if array.ndim == 2 else tensor.permute(2, 0, 1).contiguous()  # (C, S, S)


def patch_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size an image is cut at: its own, or with a side shorter than a tile, scaled up to it (aspect kept)."""
    if min(width, height) >= size:
        return width, height
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def patch_grid(width: int, height: int, size: int) -> tuple[int, int]:
    """Tiles (across, down) of `size` an image of width x height is cut into (the same count for the image
    turned by its EXIF orientation, so a header's size tells it)."""
    width, height = patch_size(width, height, size)
    return width // size, height // size


def patch_count(path: str | os.PathLike, size: int, *, max_pixels: int = MAX_PIXELS) -> tuple[int, bool]:
    """How many tiles `load_patches` cuts this image into, and whether it is resized up first, from its
    header alone ((1, False) if unreadable: the decode then reports why)."""
    try:
        with _open_checked(Path(path), max_pixels=max_pixels) as image:
            across, down = patch_grid(*image.size, size)
            return across * down, min(image.size) < size
    except DataError:
        return 1, False


def load_patches(path: str | os.PathLike, *, image_size: int, channels: int,
                 background: Background = (255, 255, 255), max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The image at its own resolution cut into a centred grid of image_size tiles: uint8 (N, C, S, S), row
    by row. Nothing is resampled, so noise keeps the statistics it has in the file (resizing averages it
    away); a side shorter than the tile is the one exception, resized up to it (aspect kept, centre crop)."""
    _check_options(image_size, channels, "patches")
    color = _background(background)
    image = _flatten(_normalize_mode(_decode(path, max_pixels=max_pixels), path), channels, color)
    width, height = patch_size(*image.size, image_size)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    across, down = patch_grid(width, height, image_size)
    left, top = (width - across * image_size) // 2, (height - down * image_size) // 2
    array = np.asarray(image, dtype=np.uint8)
    array = array[top:top + down * image_size, left:left + across * image_size]
    array = array.reshape(down, image_size, across, image_size, channels)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 2, 4, 1, 3))).flatten(0, 1)  # (N, C, S, S)


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


def to_float(batch_uint8: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on `device`; moved as uint8 first, so the copy is 4x smaller."""
    if batch_uint8.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {batch_uint8.dtype}")
    x = batch_uint8 if device is None else batch_uint8.to(device, non_blocking=True)
    return x.to(torch.float32).div_(255.0)


def make_decoder(*, image_size: int, channels: int, background: Background = (255, 255, 255),
                 fit: str = "crop") -> Callable[[str | os.PathLike], torch.Tensor]:
    """`load_image` with these options fixed, checked now rather than at the first file; for the `patches`
    fit, `load_patches`, which gives (N, C, S, S)."""
    _check_options(image_size, channels, fit)
    if fit == "patches":
        return functools.partial(load_patches, image_size=image_size, channels=channels, background=background)
    return functools.partial(load_image, image_size=image_size, channels=channels, background=background, fit=fit)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """RGB (..., 3, H, W) -> gray (..., 1, H, W) with the luma weights, as files are converted."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * weights).sum(-3, keepdim=True)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., C, H, W) with C 1 or 3 -> `channels` channels: gray replicated to RGB, RGB to luma."""
    if x.shape[-3] == channels:
        return x
    if channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return to_gray(x)
