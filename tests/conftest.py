"""Shared fixtures: small image folders made on the fly, and tiny model settings."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

TINY_ARGS = ["--model", "vector", "--image-size", "16", "--widths", "8,16", "--latent-dim", "4", "--batch-size", "2",
             "--no-disk-cache", "--device", "cpu", "-q"]


def make_blobs(folder: Path, count: int = 12, size: int = 16, seed: int = 0, mode: str = "RGB") -> list[Path]:
    """Smooth random colour blobs: learnable in a few steps, different per seed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        colour = rng.uniform(0, 1, size=3)
        pixels = (blob[..., None] * colour[None, None] * 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        path = folder / f"img_{i:03d}.png"
        (image.convert("L") if mode == "L" else image).save(path)
        paths.append(path)
    return paths


def save_tiny_checkpoint(path: Path) -> Path:
    """An untrained, seeded 16 px model (widths 8,16, latent 4) saved as a checkpoint."""
    import torch

    from vaetool.checkpoint import save_model
    from vaetool.config import ModelConfig
    from vaetool.models.vector import VAE

    torch.manual_seed(0)
    return save_model(path, VAE(ModelConfig(image_size=16, widths=(8, 16), latent_dim=4)))


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """The tiny checkpoint, shared by the command tests (a module may define its own `ckpt`)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


@pytest.fixture
def blob_folder(tmp_path: Path) -> Path:
    make_blobs(tmp_path / "data", count=12)
    return tmp_path / "data"


def tiny_families():
    """One tiny 16 px config per model family: the shapes the per-family tests share."""
    from vaetool.config import ModelConfig

    return {
        "vector": ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)),
        "spatial": ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=2, downsample=4),
        "hierarchical": ModelConfig(kind="hierarchical", image_size=16, latent_dim=4, widths=(8, 16),
                                    latent_channels=2, downsample=2),
    }


def tiny_model(kind: str):
    """A seeded, untrained tiny model of the family, in eval mode."""
    import torch

    from vaetool.models.base import build_model

    torch.manual_seed(0)
    return build_model(tiny_families()[kind]).eval()
