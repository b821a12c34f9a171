"""What `vaetool info` shows: a checkpoint's format, size, family, latent levels, settings, training and prior."""

from __future__ import annotations

import os
from typing import Any

from ..checkpoint import load_model
from ..models.base import count_parameters


def checkpoint_summary(source: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file or run folder described as plain JSON-ready values."""
    loaded = load_model(source)
    size = loaded.config.image_size
    return {
        "path": str(loaded.path), "format_version": int(loaded.metadata.get("format_version", 0)),
        "vaetool_version": loaded.metadata.get("vaetool_version"), "created": loaded.metadata.get("created"),
        "parameters": count_parameters(loaded.model), "identity": loaded.identity, "family": loaded.config.kind,
        "levels": {name: list(shape) for name, shape in loaded.model.latent_shapes(size, size).items()},
        "model": loaded.config.to_dict(),
        "train": loaded.train_config.to_dict() if loaded.train_config else None,
        "training": loaded.training,
        "prior": loaded.prior.describe() if loaded.prior is not None else None,
    }
