"""Data of the denoising benchmark: clean training and held-out sets, noisy copies as a user would have them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
# Out-of-domain test photographs that scikit-image ships (no model is trained on photographs).
TEST_PHOTOS = ("camera", "chelsea", "coins", "gravel", "astronaut", "coffee")


def save(array: np.ndarray, path: Path) -> None:
    """Float (H, W[, 3]) in [0, 1] -> 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as float in [0, 1]: (H, W) gray or (H, W, 3) colour (alpha dropped)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    image = image[..., :3] if image.ndim == 3 else image
    return image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0 if image.max() > 1 else 1.0)


def make_faces_data(root: Path, *, train: int, test: int) -> tuple[Path, Path]:
    """64 px training faces, and held-out 64 px test faces drawn with another seed (never seen)."""
    from faces import make_faces

    if not (root / "train").exists():
        make_faces(root / "train", count=train, size=64, seed=0)
        make_faces(root / "test", count=test, size=64, seed=1)
        for split in ("train", "test"):
            (root / split / "attributes.csv").unlink()
    return root / "train", root / "test"


def make_detail_data(root: Path, *, train: int, test: int) -> tuple[Path, Path]:
    """The detail-rich 64 px set (examples/detail.py): training images and a disjoint held-out draw."""
    from detail import make_split

    if not (root / "train").exists():
        make_split(root, count=train, held_out=test, size=64, seed=0, workers=2)
        for split in ("train", "test"):
            (root / split / "labels.csv").unlink()
    return root / "train", root / "test"


def make_photo_data(root: Path, *, count: int) -> Path:
    """The out-of-domain test photographs, whole (up to 512 px a side)."""
    if not (root / "test").exists():
        for name in TEST_PHOTOS[:count]:
            save(photo(name), root / "test" / f"{name}.png")
    return root / "test"


def make_noisy(clean_dir: Path, out: Path, sigma255: float) -> list[tuple[Path, Path]]:
    """(clean, noisy) PNG pairs under `out`, mirroring `clean_dir`: Gaussian noise of std sigma255 / 255,
    clipped to [0, 1] and saved at 8 bits, as a user's noisy files are; seeded by sigma and name."""
    pairs = []
    for clean in sorted(clean_dir.rglob("*.png")):
        noisy = out / clean.relative_to(clean_dir)
        if not noisy.exists():
            image = load(clean)
            rng = np.random.default_rng([int(sigma255 * 10), *clean.name.encode()])
            save(image + rng.normal(0.0, sigma255 / 255.0, image.shape), noisy)
        pairs.append((clean, noisy))
    return pairs
