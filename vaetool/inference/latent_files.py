"""The files the latent commands read and write besides images: latents files checked against a model,
interpolation anchors, JSON rows, .npy tables, grids and GIFs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from ..checkpoint import Checkpoint
from ..errors import ConfigError, DataError, OutputError
from ..events import Callback, Failed, ignore
from ..io.atomic import atomic_path
from ..io.find import FoundImage, find_images
from ..io.latents import LatentsFile, load_latents, save_npy, split_row_reference
from ..io.write import save_grid
from ..models.base import Latents
from .latent_ops import _stream, encode_rows
from .latent_space import fit_levels, level_names

__all__ = ["anchor_latents", "encode_to_npy", "json_rows", "read_latents", "save_grid", "write_gif"]


def read_latents(checkpoint: Checkpoint, path: Path, *, key: str | None = None) -> LatentsFile:
    """A latents file whose levels and shapes fit the checkpoint's model (DataError naming the file if not)."""
    table = load_latents(path, key=key)
    names = level_names(checkpoint.model)
    if list(table.levels) == ["z"] and names != ["z"] and len(names) == 1:
        table.levels = {names[0]: table.levels["z"]}  # a plain table is the only level, whatever its name
    fit_levels(checkpoint.model, table.levels, str(path))
    return table


def image_means(checkpoint: Checkpoint, paths: Sequence[str | Path]) -> Latents:
    """Every level's posterior means (N, ...) for these image files, in order; DataError for one that cannot be read."""
    failed: list[Failed] = []
    keep = lambda event: failed.append(event) if isinstance(event, Failed) else None  # noqa: E731
    found: list[FoundImage] = find_images([str(p) for p in paths], callback=keep)
    parts: list[Latents] = []
    for _, _, _, levels in _stream(checkpoint, found, batch_size=64, callback=keep):
        parts.append({name: q.mu for name, q in levels.items()})
    if failed or not parts:
        reason = f"{failed[0].input}: {failed[0].reason}" if failed else f"no image found in {', '.join(map(str, paths))}"
        raise DataError(reason)
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def anchor_latents(checkpoint: Checkpoint, anchors: Sequence[str]) -> Latents:
    """Interpolation anchors (K, ...) per level: an image's posterior means, or a row of a latents file
    (`file.safetensors:3`)."""
    rows: list[Latents] = []
    for text in anchors:
        reference = split_row_reference(text)
        if reference is None:
            rows.append({name: value[:1] for name, value in image_means(checkpoint, [text]).items()})
            continue
        path, row = reference
        table = read_latents(checkpoint, path)
        if row >= table.count:
            raise DataError(f"{path} has {table.count} rows; row {row} does not exist")
        rows.append({name: value[row:row + 1] for name, value in table.levels.items()})
    return {name: torch.cat([r[name] for r in rows]) for name in rows[0]}


def json_rows(checkpoint: Checkpoint, items: Sequence[FoundImage], rows: dict[str, torch.Tensor]) -> list[dict]:
    """One JSON object per image: {"path", "mu", "logvar"[, "z"]} as lists for a vector model; for the other
    families each field is {level: the values flattened in C order}, with {"shapes": {level: shape}}."""
    names = level_names(checkpoint.model)
    if names == ["z"] and all(key in ("mu", "logvar", "z") for key in rows):
        return [{"path": str(item.path)} | {k: v[i].tolist() for k, v in rows.items()} for i, item in enumerate(items)]
    objects = []
    for i, item in enumerate(items):
        obj: dict = {"path": str(item.path), "shapes": {}}
        for key, value in rows.items():
            level, field = key.rsplit(".", 1)
            obj["shapes"][level] = list(value.shape[1:])
            obj.setdefault(field, {})[level] = value[i].flatten().tolist()
        objects.append(obj)
    return objects


def encode_to_npy(checkpoint: Checkpoint, inputs, path: Path, *, batch_size: int, sample: bool, seed: int,
                  force: bool, stdin: TextIO | None = None, callback: Callback = ignore,
                  precision: str = "auto") -> tuple[Path | None, int]:
    """The posterior means as one (N, D) float32 .npy array, which numpy.load and `vaetool decode` read.

    A .npy holds one array and no metadata, so the paths and logvar are left out: the safetensors file
    keeps them. Only a vector model's latents are one table; the other families' need the levels' shapes.
    """
    import numpy as np

    if level_names(checkpoint.model) != ["z"] or checkpoint.config.kind != "vector":
        raise ConfigError(f"{path}: a .npy holds one N x D table, but a {checkpoint.config.kind} model's latents have "
                          f"levels with shapes; write -o FILE.safetensors")
    if path.exists() and not force:  # fail before the work, not after it
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    means = [rows["mu"].numpy() for _, rows in encode_rows(checkpoint, inputs, batch_size=batch_size, sample=sample,
                                                           seed=seed, stdin=stdin, callback=callback,
                                                           precision=precision)]
    if not means:
        return None, 0
    table = np.concatenate(means).astype(np.float32)  # (N, D)
    return save_npy(path, table, force=force), len(table)


def write_gif(path: Path, frames: torch.Tensor, *, fps: int, force: bool) -> Path:
    """An animated GIF of frames (F, C, H, W) in [0, 1], there and back again, written atomically."""
    from PIL import Image

    arrays = (frames.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    pictures = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    pictures += pictures[-2:0:-1]  # there and back again, so the loop has no jump
    with atomic_path(path, force=force) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=1000 // fps, loop=0)
    return path
