"""Latent vectors: the latents file format, path-to-row references, and spherical/linear interpolation."""

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


def save_latents(path: str | Path, tensors: dict[str, torch.Tensor], *, paths: list[str], relative: list[str],
                 identity: str, config: dict[str, Any], force: bool = False) -> Path:
    """Write (N, D) tensors with the input paths, the checkpoint identity and config in the metadata."""
    metadata = {"format": "vaetool", "kind": KIND, "vaetool_version": __version__, "paths": json.dumps(paths),
                "relative": json.dumps(relative), "checkpoint": identity, "model_config": json.dumps(config)}
    with atomic_path(path, force=force) as tmp:
        write_safetensors(tmp, {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, metadata)
    return Path(path)


class Latents:
    """An (N, D) latent table read from a vaetool latents file, a plain safetensors file or a .npy."""

    def __init__(self, values: torch.Tensor, names: list[str] | None, source: Path,
                 metadata: dict[str, str] | None = None) -> None:
        self.values = values  # (N, D) float32
        self.names = names  # relative paths of the encoded images, when known
        self.source = source
        self.metadata = metadata or {}


def load_latents(path: str | Path, *, key: str | None = None) -> Latents:
    """Read latents; `key` picks a tensor (default `mu`, or the only tensor). Refuses NaN/inf and non-2-D."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a latents file made by `vaetool encode` (or .npy/.safetensors)")
    if path.suffix.lower() == ".npy":
        values, names, metadata = _read_npy(path), None, {}
    else:
        values, names, metadata = _read_safetensors(path, key)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise DataError(f"{path}: latents must be an N x D table, not shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise DataError(f"{path}: latents contain NaN or infinite values; re-encode or fix the file")
    return Latents(values.float(), names, path, metadata)


def _read_npy(path: Path) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)  # never unpickle user data
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc}); save it with numpy.save") from None
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: expected a numeric array, got {array.dtype}")
    return torch.from_numpy(array.astype("float32"))


def _read_safetensors(path: Path, key: str | None) -> tuple[torch.Tensor, list[str] | None, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            if metadata.get("format") == "vaetool" and metadata.get("kind") != KIND:
                raise DataError(f"{path} is a vaetool model checkpoint, not a latents file; "
                                f"make one with `vaetool encode`")
            if key is None:
                key = "mu" if "mu" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None or key not in keys:
                shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
                raise DataError(f"{path} holds tensors {shown or 'none'}; choose one with --key")
            values = handle.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    names = json.loads(metadata["relative"]) if metadata.get("kind") == KIND and "relative" in metadata else None
    return values, names, metadata


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
