"""Run a fixed-size image model over images of any size in overlapping, smoothly blended tiles."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# Weight at the very edge of a tile: small enough to hide the tile's edge artefacts under a
# neighbour, but positive so image borders covered by a single tile still get weight.
_EDGE_FLOOR = 1e-3


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie; made by `plan_tiles`, used to extract and blend."""

    height: int  # original image size
    width: int
    tile: int  # tile side (the model's image size)
    padded_height: int  # >= tile: the image is padded when smaller than a tile
    padded_width: int
    positions: tuple[tuple[int, int], ...]  # (top, left) of each tile in the padded image
    overlap: float = 0.25  # the overlap fraction the plan was made with (sets the blend window)

    @property
    def num_tiles(self) -> int:
        """How many tiles the plan has."""
        return len(self.positions)


def _stride(tile: int, overlap: float) -> int:
    """Step between tile starts; checks tile and overlap first."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ConfigError(f"tile must be a positive integer, not {tile!r}; pass e.g. --tile 64")
    if not (0.0 <= overlap < 1.0):  # also rejects NaN
        raise ConfigError(f"overlap must be in [0, 1), not {overlap!r}; pass e.g. --overlap 0.25")
    return max(1, round(tile * (1.0 - overlap)))


def _starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Tile starts along one axis: 0, stride, ... and the last one snapped to cover the end."""
    last = length - tile
    # range stops short of `last`, so appending it gives no duplicate and no tile out of bounds
    return tuple(range(0, last, stride)) + (last,)


def plan_tiles(height: int, width: int, *, tile: int, overlap: float = 0.25) -> TilePlan:
    """Plan overlapping `tile` x `tile` tiles covering a `height` x `width` image."""
    stride = _stride(tile, overlap)
    if height < 1 or width < 1:
        raise ConfigError(f"cannot tile an empty image of size {height}x{width}")
    padded_h, padded_w = max(height, tile), max(width, tile)
    tops, lefts = _starts(padded_h, tile, stride), _starts(padded_w, tile, stride)
    positions = tuple((top, left) for top in tops for left in lefts)
    return TilePlan(height, width, tile, padded_h, padded_w, positions, float(overlap))


def _pad_axis(image: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    """Pad the end of one spatial axis of (C, H, W): reflect, or replicate if it is too short."""
    if amount <= 0:
        return image
    # reflect needs amount < size; a 1 px (or very thin) image can only be replicated
    mode = "reflect" if amount < image.shape[dim] else "replicate"
    pad = (0, amount, 0, 0) if dim == -1 else (0, 0, 0, amount)
    return F.pad(image.unsqueeze(0), pad, mode=mode).squeeze(0)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value (and >= multiple)."""
    return max(multiple, -(-value // multiple) * multiple)


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad (C, H, W) at the bottom and right to (C, height, width) by reflection (replication where too thin)."""
    padded = _pad_axis(image, height - image.shape[-2], dim=-2)
    return _pad_axis(padded, width - image.shape[-1], dim=-1)


def extract_tiles(image: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Cut an image (C, H, W) into the plan's tiles (T, C, tile, tile), padding it if needed."""
    if image.ndim != 3 or tuple(image.shape[1:]) != (plan.height, plan.width):
        raise ValueError(
            f"image of shape {tuple(image.shape)} does not match a plan for "
            f"(C, {plan.height}, {plan.width})"
        )
    padded = pad_to(image, plan.padded_height, plan.padded_width)  # (C, Hp, Wp)
    t = plan.tile
    return torch.stack([padded[:, top : top + t, left : left + t] for top, left in plan.positions])


def _ramp(tile: int, overlap: float) -> torch.Tensor:
    """1-D window in float64: a Hann taper over the overlap width at each end, 1 between."""
    width = tile - _stride(tile, overlap)  # pixels shared with the next tile
    if width == 0:
        return torch.ones(tile, dtype=torch.float64)
    index = torch.arange(tile, dtype=torch.float64)
    edge = torch.minimum(index, tile - 1 - index)  # distance to the nearest end
    # h(d) + h(width - 1 - d) == 1, so neighbours at the planned stride sum to exactly one
    taper = 0.5 - 0.5 * torch.cos(math.pi * (edge + 0.5) / width)
    return torch.where(edge < width, taper, torch.ones_like(taper)).clamp_min(_EDGE_FLOOR)


def blend_window(
    tile: int, overlap: float, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Blend weights (tile, tile): a separable raised-cosine taper at the edges, strictly positive."""
    ramp = _ramp(tile, overlap)
    return torch.outer(ramp, ramp).to(device=device, dtype=dtype)  # (tile, tile)


def blend_tiles(tiles: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """Blend tiles (T, C, tile, tile) into the image (C, height, width) by a normalised weighted sum."""
    t = plan.tile
    if tiles.ndim != 4 or tiles.shape[0] != plan.num_tiles or tuple(tiles.shape[2:]) != (t, t):
        raise ValueError(
            f"tiles of shape {tuple(tiles.shape)} do not match a plan of {plan.num_tiles} "
            f"tiles of {t}x{t}"
        )
    # accumulate in float64 (float32 where the device has none): with a large overlap a pixel
    # sums dozens of tiles, and float32 sums would drift by more than 1e-6
    acc_dtype = torch.float32 if tiles.device.type == "mps" else torch.float64
    window = blend_window(t, plan.overlap, device=tiles.device, dtype=acc_dtype)  # (t, t)
    canvas = torch.zeros(
        (tiles.shape[1], plan.padded_height, plan.padded_width), device=tiles.device, dtype=acc_dtype
    )  # (C, Hp, Wp)
    weights = torch.zeros((plan.padded_height, plan.padded_width), device=tiles.device, dtype=acc_dtype)
    for i, (top, left) in enumerate(plan.positions):
        # per tile, so no float64 copy of all the tiles is ever held
        canvas[:, top : top + t, left : left + t].addcmul_(tiles[i].to(acc_dtype), window)
        weights[top : top + t, left : left + t] += window
    # every pixel is covered and the window is > 0, so the division is safe (partition of unity)
    image = canvas[:, : plan.height, : plan.width].div_(weights[: plan.height, : plan.width])
    return image.to(tiles.dtype).contiguous()  # (C, height, width)


def run_tiled(
    image: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int,
    overlap: float = 0.25,
    batch_size: int = 64,
) -> torch.Tensor:
    """Apply `fn` (B, C, tile, tile) -> (B, C', tile, tile) to one image (C, H, W) tile by tile."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, not {batch_size!r}")
    plan = plan_tiles(image.shape[-2], image.shape[-1], tile=tile, overlap=overlap)
    tiles = extract_tiles(image, plan)  # (T, C, tile, tile)
    outputs = [fn(tiles[i : i + batch_size]) for i in range(0, plan.num_tiles, batch_size)]
    return blend_tiles(torch.cat(outputs), plan)


def auto_tile(model_size: int) -> int:
    """The tile side for `--tile auto`: the model's own image size."""
    if model_size < 1:
        raise ConfigError(f"model image size must be positive, not {model_size!r}")
    return int(model_size)
