"""Latents files (one tensor per level and field, docs/latents.md), path-to-row references, and slerp/lerp."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .. import __version__
from .atomic import atomic_path, write_safetensors
from ..errors import DataError

KIND = "latents"
KEYS = ("mu", "logvar", "z")
FIELDS = KEYS  # what a latents file stores per level: the posterior mean and log-variance, and a drawn z


def tensor_key(level: str, field: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The safetensors key of one level's field: a file of one vector level "z" (the vector family's) keeps the
    bare `mu` / `logvar` / `z` of the files written before the families; every other is `level.field`."""
    return field if list(shapes) == ["z"] and len(shapes["z"]) == 1 else f"{level}.{field}"


def save_latents(path: str | Path, tensors: dict[str, torch.Tensor], *, paths: list[str], relative: list[str],
                 identity: str, config: dict[str, Any], force: bool = False,
                 levels: dict[str, tuple[int, ...]] | None = None, family: str | None = None,
                 image_size: tuple[int, int] | None = None) -> Path:
    """Write the latents (N, ...) with the input paths, the checkpoint identity and config in the metadata.

    `tensors` are keyed as `tensor_key` names them; `levels` (level -> shape without N, in top-down order),
    `family` and `image_size` (H, W the latents were encoded at) describe them for `load_latents`.
    """
    metadata = {"format": "vaetool", "kind": KIND, "vaetool_version": __version__, "paths": json.dumps(paths),
                "relative": json.dumps(relative), "checkpoint": identity, "model_config": json.dumps(config)}
    if levels is not None:
        metadata["levels"] = json.dumps([[name, list(shape)] for name, shape in levels.items()])
    if family is not None:
        metadata["family"] = family
    if image_size is not None:
        metadata["image_size"] = json.dumps(list(image_size))
    with atomic_path(path, force=force) as tmp:
        write_safetensors(tmp, {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, metadata)
    return Path(path)


class LatentsFile:
    """Latents read from a vaetool latents file, a plain safetensors file or a .npy: one field (mu, logvar
    or z) of every level, each (N, ...), in top-down order."""

    def __init__(self, levels: dict[str, torch.Tensor], names: list[str] | None, source: Path,
                 metadata: dict[str, str] | None = None) -> None:
        self.levels = levels  # level -> (N, ...) float32
        self.names = names  # relative paths of the encoded images, when known
        self.source = source
        self.metadata = metadata or {}

    @property
    def values(self) -> torch.Tensor:
        """The only level's (N, ...) tensor (a vector family's (N, D) table)."""
        if len(self.levels) != 1:
            raise DataError(f"{self.source} holds the latent levels {', '.join(self.levels)}, not one table")
        return next(iter(self.levels.values()))

    @property
    def count(self) -> int:
        return len(next(iter(self.levels.values())))

    @property
    def family(self) -> str | None:
        return self.metadata.get("family")

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = self.metadata.get("image_size")
        return tuple(json.loads(size)) if size else None


Latents = LatentsFile  # the name this class had before latents had levels


def load_latents(path: str | Path, *, key: str | None = None) -> LatentsFile:
    """Read latents; `key` picks the field of every level (default `mu`), or a plain file's tensor.

    Refuses NaN/inf and levels of different lengths; a 1-D tensor is one row. Whether the shapes fit a
    model is for its reader to check (`inference.latent_space.fit_levels`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a latents file made by `vaetool encode` (or .npy/.safetensors)")
    if path.suffix.lower() == ".npy":
        levels, names, metadata = {"z": _read_npy(path)}, None, {}
    else:
        levels, names, metadata = _read_safetensors(path, key)
    for name, values in list(levels.items()):
        if values.ndim == 1:
            levels[name] = values = values[None]
        if values.ndim == 0:
            raise DataError(f"{path}: latents must be rows (an N x D table, or N latent maps), not one number")
        if not torch.isfinite(values).all():
            raise DataError(f"{path}: latents contain NaN or infinite values; re-encode or fix the file")
        levels[name] = values.float()
    if len({len(v) for v in levels.values()}) > 1:
        raise DataError(f"{path}: its latent levels hold different numbers of rows; re-encode the images")
    return LatentsFile(levels, names, path, metadata)


def file_levels(metadata: dict[str, str]) -> list[tuple[str, tuple[int, ...]]] | None:
    """The (level, shape) pairs a latents file records, top-down; None for a file without them."""
    if "levels" not in metadata:
        return None
    return [(name, tuple(shape)) for name, shape in json.loads(metadata["levels"])]


def _read_npy(path: Path) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)  # never unpickle user data
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc}); save it with numpy.save") from None
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: expected a numeric array, got {array.dtype}")
    return torch.from_numpy(array.astype("float32"))


def _read_safetensors(path: Path, key: str | None) -> tuple[dict[str, torch.Tensor], list[str] | None,
                                                             dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            if metadata.get("format") == "vaetool" and metadata.get("kind") != KIND:
                raise DataError(f"{path} is a vaetool model checkpoint, not a latents file; "
                                f"make one with `vaetool encode`")
            recorded = file_levels(metadata)
            if recorded is not None:
                levels = {name: handle.get_tensor(_level_key(path, name, key or "mu", recorded, keys))
                          for name, _ in recorded}
            else:
                levels = {"z": handle.get_tensor(_plain_key(path, key, keys))}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if recorded is not None:
        for name, shape in recorded:
            if tuple(levels[name].shape[1:]) != shape:
                raise DataError(f"{path}: level {name} has shape {tuple(levels[name].shape[1:])}, not the "
                                f"{shape} its metadata records; re-encode the images")
    names = json.loads(metadata["relative"]) if metadata.get("kind") == KIND and "relative" in metadata else None
    return levels, names, metadata


def _level_key(path: Path, level: str, field: str, recorded: list, keys: list[str]) -> str:
    if field not in FIELDS:
        raise DataError(f"{path} stores {', '.join(FIELDS)} per latent level; --key {field} is none of them")
    name = tensor_key(level, field, dict(recorded))
    if name not in keys:
        hint = "; encode with --sample to store z" if field == "z" else ""
        raise DataError(f"{path} has no {name} tensor{hint}")
    return name


def _plain_key(path: Path, key: str | None, keys: list[str]) -> str:
    if key is None:
        key = "mu" if "mu" in keys else (keys[0] if len(keys) == 1 else None)
    if key is None or key not in keys:
        shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise DataError(f"{path} holds tensors {shown or 'none'}; choose one with --key")
    return key


def split_row_reference(text: str) -> tuple[Path, int] | None:
    """`latents.safetensors:3` -> (path, 3); anything else -> None."""
    match = re.fullmatch(r"(.+\.(?:safetensors|npy)):(\d+)", text)
    return (Path(match.group(1)), int(match.group(2))) if match else None


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) a + t b for a column of t values: (T, D)."""
    t = t[:, None]
    return (1 - t) * a[None] + t * b[None]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985): Gaussian latents concentrate near a sphere, so the path
    keeps a typical norm where a straight line would cut through the low-density centre (White 2016)."""
    a64, b64, t64 = a.double(), b.double(), t.double()[:, None]
    cos = (a64 @ b64 / (a64.norm() * b64.norm()).clamp_min(1e-12)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:  # nearly parallel: the straight line is the same path
        return lerp(a, b, t)
    sin = torch.sin(omega)
    out = (torch.sin((1 - t64) * omega) / sin) * a64[None] + (torch.sin(t64 * omega) / sin) * b64[None]
    return out.to(a.dtype)


def save_npy(path: str | Path, table, *, force: bool = False) -> Path:
    """Write one (N, D) array as a .npy file (numpy's format: no names, no metadata), atomically."""
    import numpy as np

    with atomic_path(path, force=force) as tmp, open(tmp, "wb") as handle:
        np.save(handle, table)  # a file object: np.save would add .npy to the temporary name
    return Path(path)
