"""Denoising one image in memory: whole at its own size (padded to the model's multiple) or cut into overlapping
tiles, run through the VAEFamily, and put back together (cropped, or blended with a smooth window).

A fixed-size model (the vector family) sees every piece resized to its image size. A model that takes
any size whose sides are multiples of f (spatial, hierarchical) sees each image whole, reflect-padded up
to a multiple of f, and its output is cropped back: nothing is resized. Tiles are only for memory: an
image above `WHOLE_IMAGE_PIXELS` (or any image, with an explicit tile side) goes through in tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..io.decode import match_channels, to_gray
from ..models.base import VAEFamily
from ..runtime import autocast
from .mmse import RowKey, estimate
from .tiling import TilePlan, auto_tile, blend_tiles, extract_tiles, pad_to, plan_tiles, round_up
from .wiener import WienerStep

TileSpec = int | str | None  # "auto", "off" / None, or a tile side in pixels
# An any-size model takes an image up to this many pixels whole; a larger one goes through in tiles of
# this area, so that one forward pass stays within a few GB of activations.
WHOLE_IMAGE_PIXELS = 2048 * 2048


# ------------------------------------------------------------------------------ one image in memory


@dataclass(frozen=True)
class Layout:
    """How one image was cut into model inputs, so that the model's outputs can be put back together."""

    height: int
    width: int
    channels: int  # the image's channels, 1 or 3
    model_channels: int
    model_size: int  # side of each model input (for the whole-image path of an any-size model, unused)
    tile: int | None  # tile side in image pixels; None: the whole image (resized, or padded when `padded`)
    plan: TilePlan | None
    count: int  # model inputs made from the image
    padded: tuple[int, int] | None = None  # the whole image padded to (Hp, Wp) for an any-size model


def resolve_tile(tile: TileSpec, model_size: int) -> int | None:
    """`auto` -> the model's size, `off`/None -> None (resize the whole image), an int -> itself."""
    if tile is None or (isinstance(tile, str) and tile.strip().lower() == "off"):
        return None
    if isinstance(tile, str) and tile.strip().lower() == "auto":
        return auto_tile(model_size)
    try:
        side = int(tile)
    except (TypeError, ValueError):
        raise ConfigError(f"tile must be auto, off or a size in pixels, not {tile!r}") from None
    if side < 2:
        raise ConfigError(f"tile must be at least 2 pixels, not {side}; pass e.g. --tile {model_size}")
    return side


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, height, width); antialiased bilinear, a no-op at the same size."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def _to_model_channels(x: torch.Tensor, model_channels: int) -> torch.Tensor:
    """(N, C, S, S) -> the model's channels: gray replicated for a colour model, colour split for a gray one."""
    n, c, h, w = x.shape
    if c == model_channels or c == 1:
        return match_channels(x, model_channels)  # (N, model_channels, S, S)
    # Each colour channel goes through the gray model as its own image: converting to gray would lose the colour.
    return x.reshape(n * 3, 1, h, w)  # (3N, 1, S, S)


def _from_model_channels(y: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of `_to_model_channels` on the model's outputs."""
    n, mc, h, w = y.shape
    if mc == channels:
        return y
    if channels == 1:
        return to_gray(y)  # (N, 1, S, S), as PIL makes gray from RGB
    return y.reshape(n // 3, 3, h, w)  # (N, 3, S, S)


def split_image(pixels: torch.Tensor, *, model_size: int, model_channels: int, tile: int | None,
                overlap: float = 0.25, multiple: int | None = None,
                max_pixels: int | None = None) -> tuple[torch.Tensor, Layout]:
    """Cut an image (C, H, W) into model inputs (N, model_channels, S, S) and the layout to reassemble them.

    `multiple` None: a fixed-size model, every piece resized to `model_size`. Otherwise an any-size model
    whose sides must be multiples of it: the image whole (reflect-padded), or, with `tile` or above
    `max_pixels`, tiles of that side (rounded up to the multiple) at their own resolution.
    """
    c, h, w = pixels.shape
    if multiple is not None:
        return _split_any_size(pixels, model_channels=model_channels, tile=tile, overlap=overlap,
                               multiple=multiple, max_pixels=max_pixels)
    if tile is None:
        pieces = _resize(pixels[None], model_size, model_size)  # (1, C, S, S)
        plan = None
    else:
        plan = plan_tiles(h, w, tile=tile, overlap=overlap)
        pieces = _resize(extract_tiles(pixels, plan), model_size, model_size)  # (T, C, S, S)
    inputs = _to_model_channels(pieces, model_channels).contiguous()
    return inputs, Layout(h, w, c, model_channels, model_size, tile, plan, inputs.shape[0])


def memory_tile(max_pixels: int, multiple: int) -> int:
    """The tile side for an image too large to go through whole: the largest multiple within `max_pixels`."""
    return max(multiple, int(math.isqrt(max_pixels)) // multiple * multiple)


def _split_any_size(pixels: torch.Tensor, *, model_channels: int, tile: int | None, overlap: float, multiple: int,
                    max_pixels: int | None) -> tuple[torch.Tensor, Layout]:
    c, h, w = pixels.shape
    if tile is None and max_pixels is not None and h * w > max_pixels:
        tile = memory_tile(max_pixels, multiple)
    if tile is None:
        hp, wp = round_up(h, multiple), round_up(w, multiple)
        # reflection, not zeros: the padded border looks like the image, so its edge pixels stay clean
        inputs = _to_model_channels(pad_to(pixels, hp, wp)[None], model_channels).contiguous()  # (1|3, Cm, Hp, Wp)
        return inputs, Layout(h, w, c, model_channels, max(hp, wp), None, None, inputs.shape[0], (hp, wp))
    side = round_up(tile, multiple)
    plan = plan_tiles(h, w, tile=side, overlap=overlap)
    inputs = _to_model_channels(extract_tiles(pixels, plan), model_channels).contiguous()  # (T, Cm, side, side)
    return inputs, Layout(h, w, c, model_channels, side, side, plan, inputs.shape[0])


def join_outputs(outputs: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Put the model's outputs (N, model_channels, S, S) back into one image (C, H, W)."""
    pieces = _from_model_channels(outputs.float(), layout.channels)  # (T, C, S, S)
    if layout.padded is not None:
        return pieces[0, :, : layout.height, : layout.width].clamp(0.0, 1.0).contiguous()
    if layout.plan is None:
        return _resize(pieces, layout.height, layout.width)[0]
    pieces = _resize(pieces, layout.tile, layout.tile)
    if layout.plan.num_tiles == 1:  # a lone tile's blend would only divide its window out again
        return pieces[0, :, : layout.height, : layout.width].clamp(0.0, 1.0).contiguous()
    return blend_tiles(pieces, layout.plan).clamp_(0.0, 1.0)


def mix(denoised: torch.Tensor, original: torch.Tensor, strength: float) -> torch.Tensor:
    """strength * denoised + (1 - strength) * original; 1 returns `denoised` itself."""
    if strength >= 1.0:
        return denoised
    return torch.lerp(original.to(denoised.dtype), denoised, float(strength))


class ModelRunner:
    """The model's clean estimate of batches: (B, C, S, S) float on CPU in, the same out.

    `samples` 0: the decode of the posterior means (deterministic, one pass). K > 0: the MMSE estimate,
    the mean of K posterior samples' decodes (`mmse.py`), with noise seeded by `seed` and each row's key.
    `mirror`: each estimate is the mean of the input's and its mirror image's (mirrored back), for a model
    trained with mirrored images (`train --flip`); a plausible version (a row whose key names a draw) stays
    one draw.
    """

    def __init__(self, model: VAEFamily, *, amp_dtype: torch.dtype | None = None, samples: int = 0,
                 seed: int = 0, mirror: bool = False) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.amp_dtype = amp_dtype
        self.size = model.config.image_size
        self.channels = model.config.channels
        self.multiple = model.size_multiple  # None: a fixed-size model; else any size whose sides it divides
        self.samples, self.seed, self.mirror = samples, seed, mirror

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor, keys: Sequence[RowKey] | None = None) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        rows = [i for i, key in enumerate(keys or [None] * len(x)) if key is None or key[2] is None]
        if self.mirror and rows:  # the mirror images go through in the same pass, with the same posterior noise
            index = torch.tensor(rows, device=x.device)
            x = torch.cat([x, x[index].flip(-1)])
            keys = None if keys is None else [*keys, *(keys[i] for i in rows)]
        with autocast(self.device, self.amp_dtype):
            out = estimate(self.model, x, keys, samples=self.samples, seed=self.seed).float()
        if self.mirror and rows:
            out, mirrored = out[:len(batch)].clone(), out[len(batch):]
            out[index] = (out[index] + mirrored.flip(-1)) / 2
        return out.cpu()  # (B, C, S, S)

    def tiling(self, tile: TileSpec) -> tuple[int | None, int | None]:
        """(tile side or None for whole images, the most pixels taken whole or None for no bound) for `tile`.

        A fixed-size model: `auto` is tiles of its size, `off` the whole image resized. An any-size model:
        `auto` is the whole image up to `WHOLE_IMAGE_PIXELS`, `off` the whole image always, N tiles of N px.
        """
        if self.multiple is None:
            return resolve_tile(tile, self.size), None
        if isinstance(tile, str) and tile.strip().lower() == "auto":
            return None, WHOLE_IMAGE_PIXELS
        return resolve_tile(tile, self.size), None

    def split(self, pixels: torch.Tensor, *, tile: int | None, max_pixels: int | None,
              overlap: float) -> tuple[torch.Tensor, Layout]:
        """`split_image` with this model's size, channels and multiple."""
        return split_image(pixels, model_size=self.size, model_channels=self.channels, tile=tile, overlap=overlap,
                           multiple=self.multiple, max_pixels=max_pixels)

    def rows_per_batch(self, batch_size: int, input_shape: torch.Size | tuple[int, ...]) -> int:
        """How many inputs of this shape go through at once: `batch_size` model-size tiles' worth of pixels,
        so whole images of any size take no more memory per pass than a batch of tiles."""
        pixels = input_shape[-1] * input_shape[-2] * (2 if self.mirror else 1)  # a mirror image per input
        return max(1, min(batch_size, batch_size * self.size * self.size // pixels))


def check_options(*, overlap: float, strength: float, batch_size: int) -> None:
    """ConfigError naming the option when the overlap, strength or batch size is out of range."""
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), not {overlap}; pass e.g. --overlap 0.25")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], not {strength}; 1 is fully denoised")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")


def denoise_image(model: VAEFamily | ModelRunner, pixels: torch.Tensor, *, tile: TileSpec = "auto", overlap: float = 0.25,
                  strength: float = 1.0, batch_size: int = 64, samples: int = 0, seed: int = 0,
                  wiener: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  mirror: bool = False) -> torch.Tensor:
    """Denoise one image (C, H, W) in [0, 1], C 1 or 3, any size; returns (C, H, W) float32 on the CPU.

    `samples` K > 0 (for a bare model) gives the MMSE estimate over K posterior samples seeded by `seed`;
    `wiener(noisy, estimate)` (a `wiener.WienerStep`) refines the estimate before the strength mix; a
    WienerStep's blend also gets the model's estimate of the image moved by its probe (Monte-Carlo SURE).
    `mirror`: the model's estimates averaged with their mirror images' (`ModelRunner`).
    """
    check_options(overlap=overlap, strength=strength, batch_size=batch_size)
    run = model if isinstance(model, ModelRunner) else ModelRunner(model, samples=samples, seed=seed, mirror=mirror)
    original = pixels.detach().to("cpu", torch.float32)
    side, max_pixels = run.tiling(tile)
    inputs, layout = run.split(original, tile=side, max_pixels=max_pixels, overlap=overlap)
    rows = run.rows_per_batch(batch_size, inputs.shape)
    keys = [(0, row, None) for row in range(layout.count)]  # the same noise whatever the batch size

    def estimate(pieces: torch.Tensor) -> torch.Tensor:
        outputs = torch.cat([run(pieces[i: i + rows], keys[i: i + rows]) for i in range(0, layout.count, rows)])
        return join_outputs(outputs, layout)

    denoised = estimate(inputs)
    if wiener is None:
        return mix(denoised, original, strength)
    probe = wiener.probe(original) if isinstance(wiener, WienerStep) else None
    if probe is None:
        return mix(wiener(original, denoised), original, strength)
    moved = estimate(run.split(probe.moved(original), tile=side, max_pixels=max_pixels, overlap=overlap)[0])
    return mix(wiener(original, denoised, probe, moved), original, strength)
