"""The decoded training cache: skipped files, strict mode, worker processes, the disk cache, memory mapping."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagefiles import bad_file, found_list, good_set, noise
from vaetool.errors import DataError
from vaetool.io import cache as imagecache
from vaetool.io.cache import build_cache
from vaetool.io.decode import load_image


# ------------------------------------------------------------------------------------------ cache


def test_build_cache_skips_bad_files(tmp_path: Path) -> None:
    good = good_set(tmp_path)
    files = good[:2] + [bad_file(tmp_path)] + good[2:]
    seen: list[tuple[int, int]] = []
    cache = build_cache(found_list(files), image_size=8, channels=3, workers=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert cache.images.shape == (4, 3, 8, 8) and cache.images.dtype == torch.uint8
    assert cache.paths == good
    assert [p for p, _ in cache.skipped] == [files[2]] and "not an image" in cache.skipped[0][1]
    assert not cache.on_disk and not cache.reused
    for row, path in zip(cache.images, good):
        assert torch.equal(row, load_image(path, image_size=8, channels=3))
    assert seen[-1] == (5, 5) and len(seen) == 5


def test_build_cache_strict_and_all_bad(tmp_path: Path) -> None:
    files = good_set(tmp_path, 2) + [bad_file(tmp_path)]
    with pytest.raises(DataError, match="bad.png"):
        build_cache(found_list(files), image_size=8, channels=3, strict=True)
    with pytest.raises(DataError, match="none of the 1 images"):
        build_cache(found_list([files[-1]]), image_size=8, channels=3)


@pytest.mark.skipif(not imagecache.use_processes(10**6, 2), reason="decoding in forked processes needs Linux")
def test_build_cache_in_worker_processes_equals_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = good_set(tmp_path, 40)
    files = good[:5] + [bad_file(tmp_path)] + good[5:] + [tmp_path / "missing.png"]
    found = found_list(files)
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
        build_cache(found_list(files[5:6] + files[-1:]), image_size=8, channels=3, workers=2)


def test_build_cache_reuses_the_disk_cache(tmp_path: Path) -> None:
    files = good_set(tmp_path / "data") + [bad_file(tmp_path / "data")]
    cache_dir = tmp_path / "cache"
    first = build_cache(found_list(files), image_size=8, channels=1, cache_dir=cache_dir)
    second = build_cache(found_list(files), image_size=8, channels=1, cache_dir=cache_dir)
    assert not first.reused and second.reused and second.on_disk
    assert torch.equal(first.images, second.images)
    assert second.paths == first.paths and second.skipped == first.skipped
    other_size = build_cache(found_list(files), image_size=4, channels=1, cache_dir=cache_dir)
    assert not other_size.reused
    Image.fromarray(noise(5, 5, seed=9)).save(files[0])  # an edited file changes the key
    os.utime(files[0], ns=(1, 1))
    edited = build_cache(found_list(files), image_size=8, channels=1, cache_dir=cache_dir)
    assert not edited.reused and not torch.equal(edited.images[0], first.images[0])


def test_build_cache_memory_mapped_equals_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = good_set(tmp_path / "data") + [bad_file(tmp_path / "data")]
    in_memory = build_cache(found_list(files), image_size=8, channels=3)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    temporary = build_cache(found_list(files), image_size=8, channels=3, memory_limit=1)
    assert temporary.on_disk and torch.equal(temporary.images, in_memory.images)
    assert list((tmp_path / "tmp").iterdir()) == []  # the mapped temporary file is already unlinked
    cache_dir = tmp_path / "cache"
    mapped = build_cache(found_list(files), image_size=8, channels=3, memory_limit=1, cache_dir=cache_dir)
    assert mapped.on_disk and not mapped.reused and torch.equal(mapped.images, in_memory.images)
    assert mapped.paths == in_memory.paths and mapped.skipped == in_memory.skipped
    (data_file,) = cache_dir.glob("*.u8")
    assert data_file.stat().st_size == in_memory.images.numel()  # the bad file's slot was truncated away
    again = build_cache(found_list(files), image_size=8, channels=3, memory_limit=1, cache_dir=cache_dir)
    assert again.reused and torch.equal(again.images, in_memory.images)


def test_interrupted_build_leaves_no_cache(tmp_path: Path) -> None:
    files = good_set(tmp_path / "data")
    cache_dir = tmp_path / "cache"

    def interrupt(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    for limit in (None, 1):
        with pytest.raises(KeyboardInterrupt):
            build_cache(found_list(files), image_size=8, channels=3, cache_dir=cache_dir, memory_limit=limit,
                        progress=interrupt)
        assert not cache_dir.exists() or list(cache_dir.iterdir()) == []
    assert not build_cache(found_list(files), image_size=8, channels=3, cache_dir=cache_dir).reused


def test_damaged_index_is_rebuilt(tmp_path: Path) -> None:
    files = good_set(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first = build_cache(found_list(files), image_size=8, channels=3, cache_dir=cache_dir)
    (index,) = cache_dir.glob("*.json")
    index.write_text("{ damaged")
    rebuilt = build_cache(found_list(files), image_size=8, channels=3, cache_dir=cache_dir)
    assert not rebuilt.reused and torch.equal(rebuilt.images, first.images)
