"""Tests for finding, decoding, converting and writing images, and the decoded training cache."""

from __future__ import annotations

import builtins
import io
import os
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from vaetool.io import cache as imagecache
from vaetool.io import images
from vaetool.errors import ConfigError, DataError, OutputError
from vaetool.io.images import (
    FoundImage,
    build_cache,
    can_write_16bit,
    detect_channels,
    find_images,
    iter_batches,
    load_image,
    make_grid,
    read_image,
    save_grid,
    supports_alpha,
    to_float,
    write_image,
)


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _uniform_16bit(value: int, size: int = 8) -> Image.Image:
    data = np.full((size, size), value, dtype="<u2")
    return Image.frombytes("I;16", (size, size), data.tobytes())


def _patch_ihdr(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's declared size, with a correct CRC, leaving the pixel data alone."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return png[:16] + body + crc + png[33:]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _palette_image(color: tuple[int, int, int], size: int = 8) -> Image.Image:
    image = Image.new("P", (size, size), 3)
    image.putpalette([0, 0, 0] * 3 + list(color) + [255, 255, 255] * 252)
    return image


def _good_set(folder: Path, count: int = 4) -> list[Path]:
    paths = []
    for i in range(count):
        paths.append(_save(Image.fromarray(_noise(12 + i, 10, seed=i)), folder / f"good_{i}.png"))
    return paths


def _found(paths: list[Path]) -> list[FoundImage]:
    return [FoundImage(p, Path(p.name)) for p in paths]


# ------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_decodes_to_the_expected_values(tmp_path: Path, channels: int) -> None:
    cases = {  # name -> (image, expected RGB after compositing on the blue background)
        "one.png": (Image.new("1", (8, 8), 1), (255, 255, 255)),
        "gray.png": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "gray_alpha.png": (Image.new("LA", (8, 8), (0, 0)), (0, 0, 255)),
        "rgb.png": (Image.new("RGB", (8, 8), (10, 200, 30)), (10, 200, 30)),
        "rgba.png": (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (128, 0, 127)),
        "palette.png": (_palette_image((200, 20, 40)), (200, 20, 40)),
        "sixteen_white.png": (_uniform_16bit(65535), (255, 255, 255)),
        "sixteen_half.png": (_uniform_16bit(32768), (128, 128, 128)),
        "float.tif": (Image.new("F", (8, 8), 0.5), (128, 128, 128)),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    }
    transparent = Image.new("P", (8, 8), 0)
    transparent.putpalette([255, 0, 0] * 256)
    transparent.info["transparency"] = 0
    cases["palette_transparent.png"] = (transparent, (0, 0, 255))
    for name, (image, rgb) in cases.items():
        path = _save(image, tmp_path / name, **({"transparency": 0} if "transparent" in name else {}))
        out = load_image(path, image_size=4, channels=channels, background=(0, 0, 255))
        assert out.dtype == torch.uint8 and out.shape == (channels, 4, 4), name
        expected = torch.tensor(rgb if channels == 3 else [round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])])
        tolerance = 6 if name.endswith(".jpg") else 1
        assert (out.float().mean((1, 2)) - expected).abs().max() <= tolerance, (name, out[:, 0, 0], expected)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    white = load_image(_save(_uniform_16bit(65535), tmp_path / "w.png"), image_size=8, channels=1)
    half = load_image(_save(_uniform_16bit(32768), tmp_path / "h.png"), image_size=8, channels=1)
    dark = load_image(_save(_uniform_16bit(1000), tmp_path / "d.png"), image_size=8, channels=1)
    assert torch.all(white == 255)
    assert torch.all((half.int() - 128).abs() <= 1)
    assert torch.all(dark == 4)  # 1000 / 257 -> 4: clipping would have given 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, 10:] = 255  # left half black, right half white, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    decoded = read_image(path)
    assert decoded.pixels.shape == (3, 20, 10)  # portrait once rotated
    assert decoded.pixels[:, :8].mean() < 0.1 and decoded.pixels[:, 12:].mean() > 0.9  # black went to the top
    loaded = load_image(path, image_size=10, channels=1, fit="pad")
    assert loaded[0, :4, 3:7].float().mean() < 30 and loaded[0, 6:, 3:7].float().mean() > 225


@pytest.mark.parametrize("size", [(1, 1), (3000, 20), (20, 3000)])
@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_extreme_sizes(tmp_path: Path, size: tuple[int, int], fit: str) -> None:
    path = _save(Image.new("RGB", size, (0, 0, 0)), tmp_path / "odd.png")
    out = load_image(path, image_size=16, channels=3, fit=fit)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    if fit == "crop" or size == (1, 1):
        assert torch.all(out == 0)  # the image fills the square
    else:
        assert out.float().mean() > 200  # a thin line of black on a white background


def test_crop_and_pad_differ_as_documented(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)  # red only in the left fifth
    pixels[:, 8:] = (0, 255, 0)
    path = _save(Image.fromarray(pixels), tmp_path / "wide.png")
    crop = load_image(path, image_size=10, channels=3, fit="crop")
    pad = load_image(path, image_size=10, channels=3, fit="pad", background=(0, 0, 255))
    assert crop[0].max() < 40 and crop[1].min() > 200  # centre crop: only green
    assert pad[0, 4, 0] > 200  # red kept at the left
    assert torch.equal(pad[:, 0, 5], torch.tensor([0, 0, 255], dtype=torch.uint8))  # padding rows
    assert torch.equal(pad[:, 9, 5], torch.tensor([0, 0, 255], dtype=torch.uint8))


def test_bad_options_are_config_errors(tmp_path: Path) -> None:
    path = _save(Image.new("L", (4, 4)), tmp_path / "x.png")
    with pytest.raises(ConfigError):
        load_image(path, image_size=8, channels=2)
    with pytest.raises(ConfigError):
        load_image(path, image_size=8, channels=3, fit="stretch")
    with pytest.raises(ConfigError):  # at the call, before any batch is taken
        iter_batches(_found([path]), image_size=8, channels=1, batch_size=0)
    with pytest.raises(ConfigError):
        build_cache(_found([path]), image_size=0, channels=1)


# ----------------------------------------------------------------------------------- broken files


def _truncated_png(path: Path) -> Path:
    data = _png_bytes(Image.fromarray(_noise(64, 64)))
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
    return path


def _writer(data: bytes | str):
    def write(path: Path) -> Path:
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path
    return write


def _declared(width: int, height: int) -> bytes:
    """A tiny real PNG whose header claims another size."""
    return _patch_ihdr(_png_bytes(Image.new("L", (4, 4))), width, height)


BROKEN = {
    "empty.png": (_writer(b""), "empty"),
    "text.jpg": (_writer("this is not an image\n"), "not an image"),
    "truncated.png": (_truncated_png, "truncated"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "bomb.png": (_writer(_declared(30000, 30000)), "too large"),
    "warning_bomb.png": (_writer(_declared(10000, 9000)), "too large"),
    "zero.png": (_writer(_declared(0, 4)), ""),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("reader", ["load", "read"])
def test_broken_files_raise_data_error_naming_the_file(tmp_path: Path, name: str, reader: str) -> None:
    make, words = BROKEN[name]
    path = make(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bomb must be refused, not warned about
        with pytest.raises(DataError) as info:
            if reader == "load":
                load_image(path, image_size=8, channels=3)
            else:
                read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message
    assert "\n" not in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = _save(Image.new("L", (100, 100)), tmp_path / "big.png")
    with pytest.raises(DataError, match="too large"):
        load_image(path, image_size=8, channels=1, max_pixels=5000)
    assert load_image(path, image_size=8, channels=1, max_pixels=10_000).shape == (1, 8, 8)


def test_unreadable_file_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("L", (4, 4)), tmp_path / "locked.png")
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(DataError, match="permission"):
        load_image(path, image_size=4, channels=1)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nope.png")


# ------------------------------------------------------------------------------------------ finding


def _tree(root: Path) -> None:
    _save(Image.new("L", (2, 2)), root / "b" / "c" / "deep.jpg")
    _save(Image.new("L", (2, 2)), root / "a.png")
    _save(Image.new("L", (2, 2)), root / "UPPER.PNG")
    _save(Image.new("L", (2, 2)), root / "with space é.png")
    _save(Image.new("L", (2, 2)), root / "ünï" / "ß.webp")
    _save(Image.new("L", (2, 2)), root / ".hidden.png")
    _save(Image.new("L", (2, 2)), root / ".git" / "inside.png")
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "data.json").write_text("{}")


def test_find_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    found = find_images([tmp_path / "in"])
    expected = ["UPPER.PNG", "a.png", "b/c/deep.jpg", "with space é.png", "ünï/ß.webp"]
    assert [str(f.relative) for f in found] == expected
    assert all(f.path.is_file() and f.path == tmp_path / "in" / f.relative for f in found)


def test_find_images_survives_a_symlink_loop(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    os.symlink(tmp_path / "in", tmp_path / "in" / "b" / "loop")
    found = find_images([tmp_path / "in"])
    assert len(found) == 5  # the loop adds nothing and the walk ends


def test_find_images_follows_a_linked_folder_once(tmp_path: Path) -> None:
    _save(Image.new("L", (2, 2)), tmp_path / "elsewhere" / "x.png")
    (tmp_path / "in").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "link")
    assert [str(f.relative) for f in find_images([tmp_path / "in"])] == ["link/x.png"]


def test_find_images_from_stdin(tmp_path: Path) -> None:
    _tree(tmp_path / "in")
    single = _save(Image.new("L", (2, 2)), tmp_path / "single.bmp")
    stdin = io.StringIO(f"{single}\n\n{tmp_path / 'in' / 'b'}\n")
    found = find_images(["-"], stdin=stdin)
    assert [f.path for f in found] == [single, tmp_path / "in" / "b" / "c" / "deep.jpg"]
    assert [str(f.relative) for f in found] == ["single.bmp", "c/deep.jpg"]


def test_find_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found in .*empty"):
        find_images([tmp_path / "empty"])


def test_find_images_several_folders_do_not_collide(tmp_path: Path) -> None:
    for parent in ("one", "two"):
        _save(Image.new("L", (2, 2)), tmp_path / parent / "data" / "x.png")
    _save(Image.new("L", (2, 2)), tmp_path / "other" / "x.png")
    found = find_images([tmp_path / "one" / "data", tmp_path / "two" / "data", tmp_path / "other"])
    assert [str(f.relative) for f in found] == ["data/x.png", "data-2/x.png", "other/x.png"]
    files = find_images([tmp_path / "one" / "data" / "x.png", tmp_path / "other" / "x.png"])
    assert [str(f.relative) for f in files] == ["x.png", "x-2.png"]


def test_find_images_warns_about_unreadable_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path / "in")
    locked = tmp_path / "in" / "b"
    real_scandir = os.scandir

    def fake_scandir(path=".", *args):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    messages: list[str] = []
    found = find_images([tmp_path / "in"], on_warning=messages.append)
    assert len(found) == 4 and "b/c/deep.jpg" not in [str(f.relative) for f in found]
    assert len(messages) == 1 and str(locked) in messages[0]


# --------------------------------------------------------------------------------------- channels


def test_detect_channels(tmp_path: Path) -> None:
    gray_palette = _palette_image((90, 90, 90))
    grays = [
        _save(Image.new("L", (4, 4)), tmp_path / "l.png"),
        _save(Image.new("1", (4, 4)), tmp_path / "one.png"),
        _save(Image.new("LA", (4, 4)), tmp_path / "la.png"),
        _save(_uniform_16bit(300), tmp_path / "sixteen.png"),
        _save(gray_palette, tmp_path / "gray_palette.png"),
    ]
    broken = tmp_path / "broken.png"
    broken.write_text("nope")
    assert detect_channels(grays + [broken]) == 1
    assert detect_channels(grays + [_save(Image.new("RGB", (4, 4)), tmp_path / "rgb.png")]) == 3
    color_palette = _palette_image((200, 0, 0))
    assert detect_channels(grays + [_save(color_palette, tmp_path / "color_palette.png")]) == 3


# ------------------------------------------------------------------------------------------ cache


def _bad(folder: Path) -> Path:
    path = folder / "bad.png"
    path.write_text("not a png")
    return path


def test_build_cache_skips_bad_files(tmp_path: Path) -> None:
    good = _good_set(tmp_path)
    files = good[:2] + [_bad(tmp_path)] + good[2:]
    seen: list[tuple[int, int]] = []
    cache = build_cache(_found(files), image_size=8, channels=3, workers=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert cache.images.shape == (4, 3, 8, 8) and cache.images.dtype == torch.uint8
    assert cache.paths == good
    assert [p for p, _ in cache.skipped] == [files[2]] and "not an image" in cache.skipped[0][1]
    assert not cache.on_disk and not cache.reused
    for row, path in zip(cache.images, good):
        assert torch.equal(row, load_image(path, image_size=8, channels=3))
    assert seen[-1] == (5, 5) and len(seen) == 5


def test_build_cache_strict_and_all_bad(tmp_path: Path) -> None:
    files = _good_set(tmp_path, 2) + [_bad(tmp_path)]
    with pytest.raises(DataError, match="bad.png"):
        build_cache(_found(files), image_size=8, channels=3, strict=True)
    with pytest.raises(DataError, match="none of the 1 images"):
        build_cache(_found([files[-1]]), image_size=8, channels=3)


@pytest.mark.skipif(not imagecache.use_processes(10**6, 2), reason="decoding in forked processes needs Linux")
def test_build_cache_in_worker_processes_equals_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _good_set(tmp_path, 40)
    files = good[:5] + [_bad(tmp_path)] + good[5:] + [tmp_path / "missing.png"]
    found = _found(files)
    threaded = build_cache(found, image_size=8, channels=3, workers=2)
    monkeypatch.setattr(imagecache, "PROCESS_MIN_IMAGES", 1)  # these few images through the worker processes
    assert imagecache.use_processes(len(found), 2)
    seen: list[tuple[int, int]] = []
    for limit in (None, 1):  # in shared memory, and memory-mapped from a file
        forked = build_cache(found, image_size=8, channels=3, workers=2, memory_limit=limit,
                             progress=lambda done, total: seen.append((done, total)))
        assert forked.on_disk == (limit == 1)
        assert torch.equal(forked.images, threaded.images) and forked.paths == threaded.paths
        assert forked.skipped == threaded.skipped and len(forked.skipped) == 2
    assert seen[-1] == (len(found), len(found))
    with pytest.raises(DataError, match="bad.png"):
        build_cache(found, image_size=8, channels=3, workers=2, strict=True)
    with pytest.raises(DataError, match="none of the 2 images"):
        build_cache(_found(files[5:6] + files[-1:]), image_size=8, channels=3, workers=2)


def test_build_cache_reuses_the_disk_cache(tmp_path: Path) -> None:
    files = _good_set(tmp_path / "data") + [_bad(tmp_path / "data")]
    cache_dir = tmp_path / "cache"
    first = build_cache(_found(files), image_size=8, channels=1, cache_dir=cache_dir)
    second = build_cache(_found(files), image_size=8, channels=1, cache_dir=cache_dir)
    assert not first.reused and second.reused and second.on_disk
    assert torch.equal(first.images, second.images)
    assert second.paths == first.paths and second.skipped == first.skipped
    other_size = build_cache(_found(files), image_size=4, channels=1, cache_dir=cache_dir)
    assert not other_size.reused
    Image.fromarray(_noise(5, 5, seed=9)).save(files[0])  # an edited file changes the key
    os.utime(files[0], ns=(1, 1))
    edited = build_cache(_found(files), image_size=8, channels=1, cache_dir=cache_dir)
    assert not edited.reused and not torch.equal(edited.images[0], first.images[0])


def test_build_cache_memory_mapped_equals_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _good_set(tmp_path / "data") + [_bad(tmp_path / "data")]
    in_memory = build_cache(_found(files), image_size=8, channels=3)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    temporary = build_cache(_found(files), image_size=8, channels=3, memory_limit=1)
    assert temporary.on_disk and torch.equal(temporary.images, in_memory.images)
    assert list((tmp_path / "tmp").iterdir()) == []  # the mapped temporary file is already unlinked
    cache_dir = tmp_path / "cache"
    mapped = build_cache(_found(files), image_size=8, channels=3, memory_limit=1, cache_dir=cache_dir)
    assert mapped.on_disk and not mapped.reused and torch.equal(mapped.images, in_memory.images)
    assert mapped.paths == in_memory.paths and mapped.skipped == in_memory.skipped
    (data_file,) = cache_dir.glob("*.u8")
    assert data_file.stat().st_size == in_memory.images.numel()  # the bad file's slot was truncated away
    again = build_cache(_found(files), image_size=8, channels=3, memory_limit=1, cache_dir=cache_dir)
    assert again.reused and torch.equal(again.images, in_memory.images)


def test_interrupted_build_leaves_no_cache(tmp_path: Path) -> None:
    files = _good_set(tmp_path / "data")
    cache_dir = tmp_path / "cache"

    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    for limit in (None, 1):
        with pytest.raises(KeyboardInterrupt):
            build_cache(_found(files), image_size=8, channels=3, cache_dir=cache_dir, memory_limit=limit,
                        progress=interrupt)
        assert not cache_dir.exists() or list(cache_dir.iterdir()) == []
    assert not build_cache(_found(files), image_size=8, channels=3, cache_dir=cache_dir).reused


def test_damaged_index_is_rebuilt(tmp_path: Path) -> None:
    files = _good_set(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first = build_cache(_found(files), image_size=8, channels=3, cache_dir=cache_dir)
    (index,) = cache_dir.glob("*.json")
    index.write_text("{ damaged")
    rebuilt = build_cache(_found(files), image_size=8, channels=3, cache_dir=cache_dir)
    assert not rebuilt.reused and torch.equal(rebuilt.images, first.images)


# -------------------------------------------------------------------------------------- streaming


def test_iter_batches_keeps_order_and_reports_failures(tmp_path: Path) -> None:
    good = _good_set(tmp_path, 4)
    files = _found(good[:2] + [_bad(tmp_path)] + good[2:])
    batches = list(iter_batches(files, image_size=8, channels=3, batch_size=2, workers=2))
    assert [[f.path for f in items] for items, _, _ in batches] == [good[:2], [good[2]], [good[3]]]
    assert [len(failures) for _, _, failures in batches] == [0, 1, 0]
    assert batches[1][2][0][0] == files[2] and "not an image" in batches[1][2][0][1]
    stacked = torch.cat([tensor for _, tensor, _ in batches])
    assert torch.equal(stacked, torch.stack([load_image(p, image_size=8, channels=3) for p in good]))


def test_iter_batches_all_failed_batch_is_empty(tmp_path: Path) -> None:
    bad = _bad(tmp_path)
    ((items, tensor, failures),) = list(iter_batches(_found([bad]), image_size=8, channels=1, batch_size=4))
    assert items == [] and tensor.shape == (0, 1, 8, 8) and len(failures) == 1


def test_iter_batches_decodes_only_a_bounded_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _good_set(tmp_path, 1)[0]
    calls = []
    real = images.load_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "load_image", counting)
    stream = iter_batches(_found([path]) * 1000, image_size=8, channels=1, batch_size=2, workers=2, prefetch=2)
    items, tensor, _ = next(stream)
    stream.close()
    assert tensor.shape == (2, 1, 8, 8) and len(items) == 2
    assert len(calls) <= 10  # not the whole list of 1000


def test_to_float() -> None:
    batch = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = to_float(batch, "cpu")
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([0.0, 128 / 255, 1.0]).view(1, 1, 1, 3))
    with pytest.raises(ValueError):
        to_float(out)


# ---------------------------------------------------------------------------------------- writing


def _random_pixels(channels: int, height: int, width: int, levels: int = 255) -> torch.Tensor:
    gen = torch.Generator().manual_seed(channels * 1000 + height)
    return torch.randint(0, levels + 1, (channels, height, width), generator=gen).float() / levels


def test_write_png_round_trip_is_exact(tmp_path: Path) -> None:
    for channels in (1, 3):
        pixels = _random_pixels(channels, 9, 7)
        path = write_image(tmp_path / f"out{channels}.png", pixels)
        back = read_image(path)
        assert back.format == "PNG" and back.bit_depth == 8 and back.alpha is None
        assert torch.equal(back.pixels, pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out1.png", "out3.png"]  # no temporary left


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_write_sixteen_bit_gray(tmp_path: Path, suffix: str) -> None:
    pixels = _random_pixels(1, 6, 5, levels=65535)
    path = write_image(tmp_path / f"deep{suffix}", pixels, bit_depth=16)
    back = read_image(path)
    assert back.bit_depth == 16 and torch.equal(back.pixels, pixels)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I;16")


def test_sixteen_bit_rgb_falls_back_to_eight(tmp_path: Path) -> None:
    assert can_write_16bit("png", 1) and can_write_16bit("TIFF", 1)
    assert not can_write_16bit("PNG", 3) and not can_write_16bit("JPEG", 1)
    assert not can_write_16bit("PNG", 1, has_alpha=True)
    path = write_image(tmp_path / "rgb.png", _random_pixels(3, 4, 4), bit_depth=16)
    assert read_image(path).bit_depth == 8


def test_write_jpeg_drops_alpha(tmp_path: Path) -> None:
    assert not supports_alpha("jpg") and supports_alpha("png") and supports_alpha("WEBP")
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    pixels = torch.stack([yy, xx, (yy + xx) / 2])  # (3, 16, 16), smooth so JPEG keeps it
    path = write_image(tmp_path / "photo.jpg", pixels, alpha=torch.full((1, 16, 16), 0.5))
    back = read_image(path)
    assert back.format == "JPEG" and back.alpha is None
    with Image.open(path) as stored:
        assert stored.mode == "RGB"
    assert (back.pixels - pixels).abs().mean() < 0.02


def test_alpha_round_trip_on_png(tmp_path: Path) -> None:
    for channels in (1, 3):
        pixels, alpha = _random_pixels(channels, 5, 6), _random_pixels(1, 5, 6)
        back = read_image(write_image(tmp_path / f"alpha{channels}.png", pixels, alpha=alpha))
        assert back.alpha is not None and torch.equal(back.alpha, alpha) and torch.equal(back.pixels, pixels)


def test_write_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = write_image(tmp_path / "x.png", torch.zeros(1, 4, 4))
    with pytest.raises(OutputError, match="already exists"):
        write_image(path, torch.ones(1, 4, 4))
    assert torch.all(read_image(path).pixels == 0)
    write_image(path, torch.ones(1, 4, 4), force=True)
    assert torch.all(read_image(path).pixels == 1)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_write_clamps_and_checks_format(tmp_path: Path) -> None:
    path = write_image(tmp_path / "clamped.png", torch.tensor([[[-1.0, 2.0, float("nan")]]]))
    assert read_image(path).pixels.flatten().tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(OutputError, match="extension"):
        write_image(tmp_path / "out.xyz", torch.zeros(1, 2, 2))
    explicit = write_image(tmp_path / "named.bin", torch.zeros(3, 2, 2), format="png")
    with Image.open(explicit) as stored:
        assert stored.format == "PNG"


def test_read_image_modes(tmp_path: Path) -> None:
    gray = read_image(_save(Image.new("L", (3, 2), 51), tmp_path / "g.png"))
    assert gray.pixels.shape == (1, 2, 3) and torch.allclose(gray.pixels, torch.full((1, 2, 3), 0.2))
    palette = read_image(_save(_palette_image((255, 0, 0), 2), tmp_path / "p.png"))
    assert palette.pixels.shape == (3, 2, 2) and palette.alpha is None
    assert torch.equal(palette.pixels[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    la = read_image(_save(Image.new("LA", (3, 2), (10, 255)), tmp_path / "la.png"))
    assert la.pixels.shape == (1, 2, 3) and torch.all(la.alpha == 1.0)


def test_make_grid_and_save_grid(tmp_path: Path) -> None:
    tiles = torch.stack([torch.full((1, 4, 4), i / 10) for i in range(5)])  # (5, 1, 4, 4)
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=1.0)
    assert grid.shape == (1, 14, 20)
    assert torch.all(grid[:, 2:6, 8:12] == 0.1) and torch.all(grid[:, 8:12, 8:12] == 0.4)
    assert torch.all(grid[:, 8:12, 14:18] == 1.0) and torch.all(grid[:, 0, :] == 1.0)  # empty cell is padding
    path = save_grid(tmp_path / "grid.png", tiles, nrow=3)
    assert read_image(path).pixels.shape == (1, 14, 20)


# ---------------------------------------------------------------------------------------- property

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": "<u2", "I": "<i4", "F": "<f4"}[mode]
        values = rng.uniform(0, 70000 if mode == "I" else 65535, size=(height, width)).astype(dtype)
        return Image.frombytes(mode, (width, height), values.tobytes())
    bands = len(Image.new(mode if mode != "P" else "L", (1, 1)).getbands())
    if mode == "P":
        return Image.fromarray(_noise(height, width, seed=seed)).quantize(16)
    data = rng.integers(0, 256, size=(height, width, bands), dtype=np.uint8)
    image = Image.frombytes("L" if mode == "1" else mode, (width, height), data.tobytes())
    return image.convert("1") if mode == "1" else image


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), width=st.integers(1, 80), height=st.integers(1, 80),
       channels=st.sampled_from([1, 3]), size=st.sampled_from([8, 16]), fit=st.sampled_from(["crop", "pad"]),
       seed=st.integers(0, 2**16))
def test_any_mode_and_size_converts_to_the_requested_shape(tmp_path: Path, mode: str, width: int, height: int,
                                                            channels: int, size: int, fit: str, seed: int) -> None:
    suffix = ".tif" if mode in ("I", "F", "CMYK") else ".png"
    path = tmp_path / f"random_{mode.replace(';', '_')}{suffix}"
    _random_image(mode, width, height, seed).save(path)
    out = load_image(path, image_size=size, channels=channels, fit=fit)
    assert out.dtype == torch.uint8 and out.shape == (channels, size, size)
    decoded = read_image(path)
    assert decoded.pixels.shape[1:] == (height, width) and decoded.pixels.shape[0] in (1, 3)
    assert 0.0 <= decoded.pixels.min() and decoded.pixels.max() <= 1.0
