"""Where a model puts a folder of images: posterior means, 2-D projections, thumbnail maps, attribute correlations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError, OutputError
from ..events import Callback, Progress, Started, ignore
from ..io.atomic import atomic_path
from ..io.batches import iter_batches
from ..io.decode import load_image, to_float
from ..io.find import FoundImage, find_images
from ..models.base import FactorizedPosterior
from .attributes import (Correlation, attribute_table, correlate_attributes, parse_column_spec, read_labels,
                         read_table)
from .folder import Outcome
from .load import load_for_inference, model_device

METHODS = ("auto", "pca", "dims")
MAP_DPI = 100
MAX_CATEGORIES = 20  # more distinct labels than this are drawn without a legend


@dataclass
class Means:
    """Posterior means of the images that could be read, in input order: one row of D numbers per image."""

    mu: torch.Tensor  # (N, D) float32
    found: list[FoundImage]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    symbol: str = "z"  # the level the D numbers come from: z[d] names one
    what: str = "posterior means of the latent z"  # what the D numbers are, for the output and notes


@dataclass
class Projection:
    """2-D coordinates of the means and how they were obtained."""

    points: torch.Tensor  # (N, 2) float64
    method: str  # "dims" or "pca"
    labels: tuple[str, str]  # axis labels
    dims: tuple[int, int] | None = None  # the latent dimensions shown ("dims")
    components: torch.Tensor | None = None  # (2, D) principal axes ("pca")
    explained: tuple[float, float] | None = None  # share of the means' variance along each axis ("pca")


# --------------------------------------------------------------------------------- posterior means


def map_features(model: Any) -> tuple[str, str]:
    """(symbol, description) of the numbers a map or a correlation shows for this model's family.

    The vector level when the family has one (vector: z, hierarchical: top); else each channel of the
    spatial latent's posterior mean, averaged over the map (C numbers per image, at any image size).
    """
    if model.vector_level is not None:
        return model.vector_level, f"posterior means of the level {model.vector_level!r} (one vector per image)"
    shapes = model.latent_shapes(model.config.image_size, model.config.image_size)
    names = ", ".join(f"{name!r} ({'x'.join(map(str, shape))})" for name, shape in shapes.items())
    return "+".join(shapes), f"posterior means of {names}, each channel averaged over the map"


def features(model: Any, posterior: Any) -> torch.Tensor:
    """(B, D): the vector level's posterior means, or every level's per-channel means pooled over the map."""
    name = model.vector_level
    if isinstance(posterior, FactorizedPosterior):
        means = {level: q.mu for level, q in posterior.levels.items()}
    else:  # a hierarchy's levels below the top are conditional; its means come level by level
        means = posterior.mode()
    if name is not None:
        return means[name]
    return torch.cat([mu.flatten(2).mean(2) for mu in means.values()], dim=1)  # (B, C) per level, joined


@torch.inference_mode()
def posterior_means(model: Any, found: Sequence[FoundImage], *, batch_size: int = 64,
                    device: torch.device | str = "cpu", workers: int | None = None,
                    callback: Callback = ignore) -> Means:
    """E_q[z|x] for every image (`features`: the vector level, or pooled channel means of a spatial map),
    streamed in batches (memory bounded by the batch, not the folder).

    Unreadable files are reported as `Failed` and listed in `failures`.
    """
    config = model.config
    outcome = Outcome()
    callback = outcome.recorder(callback)
    symbol, what = map_features(model)
    rows, kept, done = [], [], 0
    for good, batch, failed in iter_batches(found, image_size=config.image_size, channels=config.channels,
                                            batch_size=batch_size, workers=workers, callback=callback):
        if len(good):
            rows.append(features(model, model.encode(to_float(batch, device))).float().cpu())  # (B, D)
            kept.extend(good)
        done += len(good) + len(failed)
        callback(Progress(done, len(found)))
    if not kept:
        raise DataError(f"none of the {len(found)} images could be read; see the warnings above")
    return Means(torch.cat(rows), kept, outcome.failed, symbol, what)


# ------------------------------------------------------------------------------------- projection


def pca(x: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(components (k, D), mean (D,), explained variance ratio (k,)) of the rows of x, by SVD.

    Each component's sign is fixed (its largest loading positive) so the picture does not flip
    between runs.
    """
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)  # vh: (min(N, D), D)
    components = vh[:k]
    pick = components.abs().argmax(1, keepdim=True)
    components = components * torch.sign(components.gather(1, pick))
    variance = s.pow(2)
    explained = variance[:k] / variance.sum().clamp_min(1e-300)
    if components.shape[0] < k:  # fewer images than k: pad with zero axes
        pad = k - components.shape[0]
        components = torch.cat([components, components.new_zeros(pad, x.shape[1])])
        explained = torch.cat([explained, explained.new_zeros(pad)])
    return components, mean, explained


def _check_dims(dims: Sequence[int], latent_dim: int) -> tuple[int, int]:
    if len(dims) != 2 or dims[0] == dims[1]:
        raise ConfigError(f"give two different latent dimensions, not {list(dims)}")
    for d in dims:
        if not 0 <= d < latent_dim:
            raise ConfigError(f"latent dimension {d} does not exist; this model's are 0..{latent_dim - 1}")
    return int(dims[0]), int(dims[1])


def project(mu: torch.Tensor, *, method: str = "auto", dims: Sequence[int] | None = None,
            symbol: str = "z") -> Projection:
    """Project (N, D) means to 2-D: the latent dimensions themselves ("dims") or the top two principal axes.

    "auto" shows the dimensions when the latent is 2-D (or `dims` is given), else PCA. Without
    `dims`, "dims" on a larger latent shows the two dimensions whose means vary most.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown projection {method!r}; use one of {', '.join(METHODS)}")
    latent_dim = mu.shape[1]
    if method == "auto":
        method = "dims" if latent_dim <= 2 or dims else "pca"
    if method == "pca" and latent_dim >= 2:
        components, mean, explained = pca(mu)
        points = (mu.double() - mean) @ components.T  # (N, 2)
        ratio = tuple(float(e) for e in explained)
        labels = tuple(f"PC{i + 1} ({ratio[i]:.0%} of the variance of the means)" for i in range(2))
        return Projection(points, "pca", labels, components=components, explained=ratio)  # type: ignore[arg-type]
    if latent_dim == 1:
        raise ConfigError("a 1-D latent has no second axis to map; train with --latent-dim 2 or more")
    if dims is None:
        spread = mu.double().var(0) if mu.shape[0] > 1 else torch.zeros(latent_dim)
        dims = sorted(torch.argsort(spread, descending=True, stable=True)[:2].tolist())
    pair = _check_dims(list(dims), latent_dim)
    points = mu.double()[:, list(pair)]  # (N, 2)
    return Projection(points, "dims", (f"{symbol}[{pair[0]}]", f"{symbol}[{pair[1]}]"), dims=pair)


# ------------------------------------------------------------------------------------- placement


def map_bounds(points: torch.Tensor, *, extent: float | None = None,
               margin: float = 0.06) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1): [-extent, extent]^2 when given, else the points' box with a margin."""
    if extent is not None:
        return (-extent, extent, -extent, extent)
    lo, hi = points.min(0).values.tolist(), points.max(0).values.tolist()
    span = max(hi[0] - lo[0], hi[1] - lo[1], 1e-6)
    pad = margin * span
    return (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)


def grid_pick(points: torch.Tensor, bounds: tuple[float, float, float, float], *, cells: int) -> list[int]:
    """At most one image per square cell of a `cells`-wide grid: the one nearest the cell's centre.

    This keeps thousands of thumbnails from piling up while every occupied region stays shown.
    Points outside `bounds` are never picked.
    """
    x0, x1, y0, y1 = bounds
    side = max(x1 - x0, y1 - y0) / max(1, cells)
    p = points.double().numpy()
    inside = (p[:, 0] >= x0) & (p[:, 0] <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1)
    col = np.floor((p[:, 0] - x0) / side).astype(np.int64)
    row = np.floor((p[:, 1] - y0) / side).astype(np.int64)
    centre = np.stack([x0 + (col + 0.5) * side, y0 + (row + 0.5) * side], axis=1)
    dist = np.linalg.norm(p - centre, axis=1)
    cell = row * (cells + 1) + col
    index = np.flatnonzero(inside)
    order = index[np.lexsort((dist[index], cell[index]))]  # by cell, nearest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = cell[order][1:] != cell[order][:-1]
    return order[first].tolist()


def thumbnail_canvas(points: torch.Tensor, thumbs: Sequence[np.ndarray], bounds: tuple[float, float, float, float],
                     *, cells: int, thumb_px: int) -> np.ndarray:
    """An RGBA picture of `bounds` with each thumbnail (H, W, 3 uint8) centred at its point; transparent elsewhere."""
    from PIL import Image

    x0, x1, y0, y1 = bounds
    scale = thumb_px * cells / max(x1 - x0, y1 - y0)  # pixels per latent unit
    width, height = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    size = max(2, round(0.92 * thumb_px))  # a small gap between neighbouring cells
    for (x, y), thumb in zip(points.tolist(), thumbs):
        tile = Image.fromarray(thumb).convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)
        left = round((x - x0) * scale - size / 2)
        top = round((y1 - y) * scale - size / 2)  # image rows grow downwards, y grows upwards
        canvas.paste(tile, (left, top))
    return np.asarray(canvas)


def load_thumbnails(found: Sequence[FoundImage], *, image_size: int, channels: int) -> list[np.ndarray]:
    """The picked images again, as (S, S, 3) uint8 arrays: decoded twice rather than all kept in memory."""
    out = []
    for item in found:
        pixels = load_image(item.path, image_size=image_size, channels=channels)  # (C, S, S) uint8
        out.append(pixels.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())
    return out


# ---------------------------------------------------------------------------------------- drawing


def _scatter(ax: Any, fig: Any, points: np.ndarray, labels: Sequence[Any] | None, label_name: str | None) -> None:
    """All points: grey, or coloured by label (a legend for categories, a colour bar for numbers)."""
    size = float(np.clip(30000.0 / max(len(points), 1), 6.0, 40.0))  # marker area: smaller when crowded
    style = {"s": size, "linewidths": 0, "zorder": 1}
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], c="0.55", alpha=0.5, **style)
        return
    missing = np.array([v is None for v in labels])
    if missing.any():
        ax.scatter(points[missing, 0], points[missing, 1], c="0.8", label="no label", **style)
    given = [v for v in labels if v is not None]
    numeric = all(isinstance(v, float) for v in given)
    categories = sorted(set(given), key=lambda v: (isinstance(v, str), v))
    few_integers = numeric and len(categories) <= 12 and all(float(v).is_integer() for v in categories)
    if numeric and not few_integers:
        values = np.array([np.nan if v is None else v for v in labels], dtype=np.float64)
        drawn = ax.scatter(points[~missing, 0], points[~missing, 1], c=values[~missing], cmap="viridis", **style)
        fig.colorbar(drawn, ax=ax, label=label_name, shrink=0.8)
        return
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    for k, category in enumerate(categories):
        rows = np.array([v == category for v in labels])
        name = f"{category:g}" if isinstance(category, float) else str(category)
        ax.scatter(points[rows, 0], points[rows, 1], color=cmap(k % cmap.N), label=name, **style)
    if len(categories) <= MAX_CATEGORIES:
        legend = ax.legend(title=label_name, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        for handle in legend.legend_handles:
            handle.set_sizes([40.0])  # legible whatever the point size


def render_map(projection: Projection, bounds: tuple[float, float, float, float], *,
               canvas: np.ndarray | None = None, labels: Sequence[Any] | None = None, label_name: str | None = None,
               title: str = "", size: int = 1000) -> tuple[Any, Any]:
    """(Figure, Axes): the projected means as a scatter, with the thumbnail canvas laid over them."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    x0, x1, y0, y1 = bounds
    aspect = float(np.clip((y1 - y0) / max(x1 - x0, 1e-12), 0.6, 1.0))  # less white space around a wide cloud
    fig = Figure(figsize=(size / MAP_DPI, round(size * aspect) / MAP_DPI), dpi=MAP_DPI, layout="constrained")
    ax = fig.add_subplot()
    _scatter(ax, fig, projection.points.numpy(), labels, label_name)
    if canvas is not None:
        ax.imshow(canvas, extent=(x0, x1, y0, y1), origin="upper", interpolation="antialiased", zorder=2)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xlabel(projection.labels[0])
    ax.set_ylabel(projection.labels[1])
    ax.set_title(title, fontsize="medium")
    return fig, ax


# --------------------------------------------------------------------------------------- the jobs


@dataclass
class MapResult:
    """What `latent_map` drew."""

    path: Path
    means: Means
    projection: Projection
    placed: list[int]  # rows of `means` drawn as thumbnails
    pixels: np.ndarray  # (len(placed), 2) thumbnail centres in the written image, (column, row)
    label_name: str | None = None
    unlabeled: int = 0  # images with no row or no value in the --color-by CSV


def _encode_folder(checkpoint: str | Path, data: Sequence[str | Path], *, batch_size: int, device: str,
                   workers: int | None, stdin: Any, callback: Callback) -> tuple[Any, Means, list]:
    loaded = load_for_inference(checkpoint, device=device)
    outcome = Outcome()
    callback = outcome.recorder(callback)
    found = find_images(data, stdin=stdin, callback=callback)
    callback(Started("encode", len(found)))
    means = posterior_means(loaded.model, found, batch_size=batch_size, device=model_device(loaded), workers=workers,
                            callback=callback)
    means.failures = outcome.failed  # the unreadable folders too, not only the files
    return loaded, means, found


def latent_map(checkpoint: str | Path, data: Sequence[str | Path], output: str | Path, *, method: str = "auto",
               dims: Sequence[int] | None = None, color_by: str | None = None, thumbnails: bool | None = None,
               cells: int = 30, extent: float | None = None, size: int = 1000, title: str | None = None,
               batch_size: int = 64, device: str = "auto", workers: int | None = None, force: bool = False,
               stdin: Any = None, callback: Callback = ignore) -> MapResult:
    """Draw where the model puts each image: posterior means in 2-D, as thumbnails or a coloured scatter.

    Thumbnails are shown by default, and with `color_by` only when `thumbnails` is True; at most one
    per cell of a `cells`-wide grid, so any number of images stays readable.
    """
    output = Path(output)
    if output.exists() and not force:
        raise OutputError(f"{output} already exists; pass --force to overwrite it")
    fmt = _format(output)
    if color_by is not None:
        parse_column_spec(color_by)  # a malformed spec fails before any image is encoded
    loaded, means, found = _encode_folder(checkpoint, data, batch_size=batch_size, device=device, workers=workers,
                                          stdin=stdin, callback=callback)
    label_name, labels = _labels(color_by, found, means) if color_by is not None else (None, None)
    projection = project(means.mu, method=method, dims=dims, symbol=means.symbol)
    bounds = map_bounds(projection.points, extent=extent)
    show = thumbnails if thumbnails is not None else color_by is None
    placed = grid_pick(projection.points, bounds, cells=cells) if show else []
    canvas = _canvas(loaded.config, means, projection, placed, bounds, cells=cells) if placed else None
    if title is None:
        name = Path(checkpoint)
        name = f"{name.parent.name}/{name.name}" if name.is_file() and name.parent.name else name.name
        title = f"{len(means.found)} images in the latent space of {name}"
    fig, ax = render_map(projection, bounds, canvas=canvas, labels=labels, label_name=label_name, title=title,
                         size=size)
    with atomic_path(output, force=force) as tmp:
        fig.savefig(tmp, format=fmt, dpi=MAP_DPI)
    xy = ax.transData.transform(projection.points[placed].numpy().reshape(-1, 2))  # after drawing: final layout
    pixels = np.stack([xy[:, 0], fig.bbox.height - xy[:, 1]], axis=1)  # display y grows upwards, rows downwards
    unlabeled = sum(v is None for v in labels) if labels is not None else 0
    return MapResult(output, means, projection, placed, pixels, label_name, unlabeled)


def _labels(color_by: str, found: Sequence[FoundImage], means: Means) -> tuple[str, list[Any]]:
    """The --color-by label of each encoded image (images that failed to decode have no row in `means`)."""
    name, by_image = read_labels(color_by, found)
    lookup = dict(zip(found, by_image))
    return name, [lookup[item] for item in means.found]


def _canvas(config: Any, means: Means, projection: Projection, placed: list[int],
            bounds: tuple[float, float, float, float], *, cells: int) -> np.ndarray:
    thumbs = load_thumbnails([means.found[i] for i in placed], image_size=config.image_size, channels=config.channels)
    return thumbnail_canvas(projection.points[placed], thumbs, bounds, cells=cells,
                            thumb_px=min(config.image_size, 64))


def _format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg", "svg", "pdf"):
        raise OutputError(f"{path}: write the map as .png, .jpg, .svg or .pdf")
    return fmt


def correlate_folder(checkpoint: str | Path, data: Sequence[str | Path], attributes: str | Path, *,
                     batch_size: int = 64, device: str = "auto", workers: int | None = None, stdin: Any = None,
                     callback: Callback = ignore) -> tuple[list[Correlation], Means]:
    """Correlate the posterior means of the images with the numeric columns of a CSV (one row per image)."""
    read_table(attributes)  # a bad CSV fails before any image is encoded
    _, means, _ = _encode_folder(checkpoint, data, batch_size=batch_size, device=device, workers=workers,
                                 stdin=stdin, callback=callback)
    table = attribute_table(attributes, means.found)
    if not table:
        raise DataError(f"{attributes} has no numeric column to correlate; give a CSV with numeric attributes")
    return correlate_attributes(means.mu, table), means
