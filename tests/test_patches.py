"""Training on tiles of each image at its own resolution (--patches): the tiles, the cache of them, the split by
image, and a denoiser's run on large noisy images, whose noise resizing would average away."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imagefiles import bad_file, found_list, noise
from vaetool.checkpoint import load_model
from vaetool.cli.app import app
from vaetool.config import TrainConfig
from vaetool.io import cache as imagecache
from vaetool.io.cache import build_cache
from vaetool.io.decode import load_patches, patch_count
from vaetool.training.data import split_data
from vaetool.training.distributed import World


def _save(array: np.ndarray, path) -> object:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_an_image_is_cut_into_a_centred_grid_of_tiles_with_its_pixels_unchanged(tmp_path):
    pixels = noise(70, 100, seed=1)  # (H, W, 3) uint8
    path = _save(pixels, tmp_path / "wide.png")
    tiles = load_patches(path, image_size=32, channels=3)
    assert patch_count(path, 32) == (6, False) and tiles.shape == (6, 3, 32, 32) and tiles.dtype == torch.uint8
    top, left = (70 - 64) // 2, (100 - 96) // 2
    for k, tile in enumerate(tiles):  # row by row: not resampled, each the very pixels of its place
        row, col = divmod(k, 3)
        expected = pixels[top + 32 * row:top + 32 * row + 32, left + 32 * col:left + 32 * col + 32]
        assert np.array_equal(tile.permute(1, 2, 0).numpy(), expected)
    gray = _save(noise(40, 40, channels=1, seed=2), tmp_path / "gray.png")
    assert load_patches(gray, image_size=16, channels=1).shape == (4, 1, 16, 16)
    # A side shorter than a tile: resized up to it (the aspect kept), then cut.
    small = _save(noise(20, 50, seed=3), tmp_path / "small.png")
    assert patch_count(small, 32) == (2, True) and load_patches(small, image_size=32, channels=3).shape == (2, 3, 32, 32)
    # The count for an unreadable header is 1 (the decode then reports the file).
    assert patch_count(bad_file(tmp_path), 32) == (1, False)


def _tiled_set(folder) -> list:
    sizes = [(64, 64), (48, 100), (20, 40), (96, 96)]  # tiles of 32: 4, 3, 2 (resized up to 32x64), 9
    return [_save(noise(h, w, seed=i), folder / f"img_{i}.png") for i, (h, w) in enumerate(sizes)]


def test_the_cache_of_tiles_is_the_same_in_threads_processes_on_disk_and_reused(tmp_path, monkeypatch):
    files = _tiled_set(tmp_path / "data")
    files.insert(2, bad_file(tmp_path / "data"))
    found = found_list(files)
    warnings: list[str] = []
    cache = build_cache(found, image_size=32, channels=3, fit="patches", workers=2, on_warning=warnings.append)
    assert warnings == ["1 of 5 images have a side shorter than the 32px patches and are resized up to them, which "
                        "changes their noise; give a smaller --image-size to keep it"]
    assert cache.counts == [4, 3, 2, 9] and cache.image_count == 4 and cache.images.shape == (18, 3, 32, 32)
    assert cache.paths == [files[0]] * 4 + [files[1]] * 3 + [files[3]] * 2 + [files[4]] * 9
    assert [p for p, _ in cache.skipped] == [files[2]]
    assert torch.equal(cache.images[4:7], load_patches(files[1], image_size=32, channels=3))
    assert torch.equal(cache.images[9:], load_patches(files[4], image_size=32, channels=3))
    others = [build_cache(found, image_size=32, channels=3, fit="patches", workers=2, memory_limit=1)]
    if imagecache.use_processes(10**6, 2):
        monkeypatch.setattr(imagecache, "PROCESS_MIN_IMAGES", 1)
        others.append(build_cache(found, image_size=32, channels=3, fit="patches", workers=2))
        others.append(build_cache(found, image_size=32, channels=3, fit="patches", workers=2, memory_limit=1))
    first = build_cache(found, image_size=32, channels=3, fit="patches", cache_dir=tmp_path / "cache")
    again = build_cache(found, image_size=32, channels=3, fit="patches", cache_dir=tmp_path / "cache")
    assert again.reused and not first.reused
    for other in [*others, first, again]:
        assert torch.equal(other.images, cache.images) and other.paths == cache.paths
        assert other.counts == cache.counts and other.skipped == cache.skipped
    resized = build_cache(found, image_size=32, channels=3, cache_dir=tmp_path / "cache")  # another key
    assert not resized.reused and resized.counts is None and resized.images.shape == (4, 3, 32, 32)


def test_the_split_holds_out_whole_images_never_some_of_their_tiles():
    counts = [4, 3, 1, 9, 2, 6, 5, 2, 8, 1]
    config = TrainConfig(val_fraction=0.3, batch_size=4)
    split = split_data(sum(counts), config, World(), warn=lambda _: None, groups=counts)
    image_of = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])
    val_images, train_images = set(image_of[split.val_index].tolist()), set(image_of[split.train_index].tolist())
    assert len(val_images) == 3 and not val_images & train_images and len(val_images | train_images) == 10
    assert sorted(split.val_index.tolist() + split.train_index.tolist()) == list(range(sum(counts)))
    for image in val_images:  # every tile of a held-out image is held out
        assert int((image_of[split.val_index] == image).sum()) == counts[image]
    again = split_data(sum(counts), config, World(), warn=lambda _: None, groups=counts)
    assert torch.equal(again.val_index, split.val_index) and torch.equal(again.train_index, split.train_index)


def _noisy_photos(folder, count: int, size: int, sigma: float, seed: int = 0) -> None:
    """Smooth colour images with Gaussian noise of std `sigma` in every pixel, saved as 8-bit PNG."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 4, 4, generator=generator)
    clean = 0.25 + 0.5 * torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    noisy = (clean + sigma * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    for i, image in enumerate(noisy):
        _save((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), folder / f"n_{i}.png")


@pytest.mark.parametrize("how", ["default", "--resize"])
def test_a_denoiser_trains_on_tiles_of_large_noisy_images_and_sees_their_noise(tmp_path, how):
    sigma = 0.1
    _noisy_photos(tmp_path / "noisy", count=6, size=64, sigma=sigma)
    command = ["train", str(tmp_path / "noisy"), "-o", str(tmp_path / "run"), "--noise-model", "gaussian",
               "--recorrupt", "--image-size", "16", "--widths", "8", "--steps", "2", "--batch-size", "8",
               "--no-disk-cache", "--no-report", "--device", "cpu", "--no-fit-prior", "--val-fraction", "0.2"]
    result = CliRunner().invoke(app, command + ([how] if how != "default" else []))
    assert result.exit_code == 0, result.stderr
    loaded = load_model(tmp_path / "run" / "last.safetensors")
    [recorrupt] = loaded.train_config.corruptions
    if how == "default":  # a denoiser's default: 16 tiles of each 64 px image, its noise as in the files
        assert loaded.train_config.patches
        assert "80 training and 16 validation patches of 16px cut from 6 images" in result.stderr
        assert abs(recorrupt.low - sigma) < 0.1 * sigma
    else:  # resized to 16 px, each pixel the average of 16: the noise mostly gone, the estimate far too low
        assert not loaded.train_config.patches
        assert "5 training and 1 validation images" in result.stderr
        assert recorrupt.low < 0.5 * sigma


def test_the_tile_count_from_the_header_holds_for_an_image_turned_by_its_exif_orientation(tmp_path):
    image = Image.fromarray(noise(40, 100, seed=4))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display: decoded as 40 wide and 100 high
    path = tmp_path / "turned.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    tiles = load_patches(path, image_size=32, channels=3)
    assert patch_count(path, 32) == (len(tiles), False) and tiles.shape == (3, 3, 32, 32)


def test_a_run_on_tiles_resumes_on_the_same_tiles(tmp_path):
    _noisy_photos(tmp_path / "noisy", count=4, size=48, sigma=0.1)
    command = ["train", str(tmp_path / "noisy"), "-o", str(tmp_path / "run"), "--corrupt", "gaussian:0.1",
               "--image-size", "16", "--widths", "8", "--batch-size", "8", "--no-disk-cache", "--no-report",
               "--device", "cpu", "--no-fit-prior", "--val-fraction", "0.25"]
    first = CliRunner().invoke(app, command + ["--steps", "2"])
    assert first.exit_code == 0, first.stderr
    assert "27 training and 9 validation patches of 16px cut from 4 images" in first.stderr
    again = CliRunner().invoke(app, command + ["--steps", "4", "--resume"])
    assert again.exit_code == 0, again.stderr
    assert "27 training and 9 validation patches" in again.stderr
    assert load_model(tmp_path / "run" / "last.safetensors").train_config.patches
    refused = CliRunner().invoke(app, command + ["--steps", "6", "--resume", "--resize"])
    assert refused.exit_code == 2 and "--resize (the run used --patches)" in refused.stderr
