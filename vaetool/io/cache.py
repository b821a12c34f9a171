"""The decoded training cache: every image decoded once into uint8, in memory or memory-mapped on disk.

One row per image, resized to the training size, or with the `patches` fit the rows of the tiles each image
is cut into at its own resolution (as many as its header says, counted before decoding so the rows can be
allocated at once)."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import mmap
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError, OutputError
from .atomic import atomic_path
from .decode import Background, UnreadableImageError, failure_reason, make_decoder, patch_count
from .find import FoundImage
from .pool import default_workers, map_data

CACHE_VERSION = 1
# (a cache of tiles records the tiles of each image in its index: the same version reads both)


@dataclass
class ImageCache:
    """Every training image decoded once into one uint8 tensor."""

    images: torch.Tensor  # (N, C, S, S) uint8, possibly memory-mapped
    paths: list[Path]  # the file behind each row of `images`
    skipped: list[tuple[Path, str]]  # (file, reason) for files that could not be decoded
    on_disk: bool  # memory-mapped from a file rather than held in RAM
    reused: bool  # mapped from a previous run's cache without decoding anything
    counts: list[int] | None = None  # with the `patches` fit: the rows (tiles) of each image, in order

    @property
    def image_count(self) -> int:
        """The images decoded (rows are tiles of them with the `patches` fit)."""
        return len(self.counts) if self.counts is not None else len(self.paths)


# ------------------------------------------------------------------------------------------- cache


def build_cache(found: Sequence[FoundImage], *, image_size: int, channels: int,
                background: Background = (255, 255, 255), fit: str = "crop", workers: int | None = None,
                cache_dir: str | os.PathLike | None = None, memory_limit: int | None = None, strict: bool = False,
                progress: Callable[[int, int], None] | None = None,
                on_warning: Callable[[str], None] | None = None) -> ImageCache:
    """Decode every image once into a uint8 (N, C, S, S) tensor, on `workers` threads (with the `patches`
    fit, N the tiles of all the images).

    With `cache_dir`, the result is also stored there (raw uint8 file + JSON index, keyed by the
    files' paths, sizes and mtimes and the decode options) and a later call with the same key maps
    it instead of decoding. Above `memory_limit` bytes the tensor is a memory-mapped file (in
    `cache_dir`, else a deleted temporary file), so RSS stays bounded. Unreadable files are
    skipped and listed, or raise DataError with `strict`.
    """
    decode = make_decoder(image_size=image_size, channels=channels, background=background, fit=fit)
    if not found:
        raise DataError("no images to decode; check the input folders")
    shape = (channels, image_size, image_size)
    key = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key = cache_key(found, image_size=image_size, channels=channels, background=background, fit=fit)
        cache = _reuse(cache_dir, key, found, shape, strict=strict)
        if cache is not None:
            if progress:
                progress(len(found), len(found))
            return cache
    counts = None
    if fit == "patches":
        layouts = [patch_count(item.path, image_size) for item in found]
        counts = [count for count, _ in layouts]
        upscaled = sum(resized for _, resized in layouts)
        if upscaled and on_warning:
            on_warning(f"{upscaled} of {len(found)} images have a side shorter than the {image_size}px patches and "
                       f"are resized up to them, which changes their noise; give a smaller --image-size to keep it")
    rows = sum(counts) if counts else len(found)
    processes = use_processes(len(found), workers)
    fill = functools.partial(_fill, found, decode, counts, workers=workers, strict=strict, progress=progress,
                             processes=processes)
    if memory_limit is not None and rows * _row_bytes(shape) > memory_limit:
        return _build_mapped(found, shape, rows, fill, cache_dir=cache_dir, key=key, tiled=counts is not None)
    images = _shared_empty(rows, shape) if processes else torch.empty((rows, *shape), dtype=torch.uint8)
    good, skipped, used = fill(images)
    cache = _cache(found, images[:sum(used)], good, skipped, used if counts else None, on_disk=False, reused=False)
    if cache_dir is not None and key is not None:  # persist for the next run
        try:
            _save(cache_dir, key, cache.images, good, skipped, cache.counts)
        except OutputError as exc:  # the cache only saves time; training can go on without it
            if on_warning:
                on_warning(f"decoded images not cached: {exc}")
    return cache


def _row_bytes(shape: tuple[int, int, int]) -> int:
    return shape[0] * shape[1] * shape[2]


def _cache(found: Sequence[FoundImage], images: torch.Tensor, good: list[int], skipped: list[tuple[int, str]],
           counts: list[int] | None, *, on_disk: bool, reused: bool) -> ImageCache:
    """The cache of these rows: each good image's path once per row it has."""
    paths = [found[i].path for i, n in zip(good, counts or [1] * len(good)) for _ in range(n)]
    return ImageCache(images, paths, [(found[i].path, r) for i, r in skipped], on_disk=on_disk, reused=reused,
                      counts=counts)


def _as_rows(image: torch.Tensor, path: Path, expected: int) -> torch.Tensor:
    """A decoded image as rows (1, C, S, S), or its tiles (N, C, S, S), checked against the rows allocated."""
    rows = image[None] if image.dim() == 3 else image
    if len(rows) != expected:  # the header counted when the rows were allocated said otherwise
        raise UnreadableImageError(path, "changed while it was read; run again")
    return rows


def _fill(found: Sequence[FoundImage], decode: Callable[[Path], torch.Tensor], counts: list[int] | None,
          target: torch.Tensor, *, workers: int | None, strict: bool, progress: Callable[[int, int], None] | None,
          processes: bool = False) -> tuple[list[int], list[tuple[int, str]], list[int]]:
    """Decode into consecutive rows of `target` (`counts[i]` rows for image i, else one); return (indices
    decoded, (index, reason) skipped, the rows of each decoded image)."""
    if processes:
        return _fill_in_processes(found, decode, counts, target, workers=workers or default_workers(),
                                  strict=strict, progress=progress)
    good: list[int] = []
    used: list[int] = []
    skipped: list[tuple[int, str]] = []
    first_error: DataError | None = None
    window = 4 * (workers or default_workers())
    row = 0
    decoded = map_data(lambda item: decode(item.path), found, workers=workers, window=window)
    with contextlib.closing(decoded) as results:
        for index, (_, image, error) in enumerate(results):
            if error is None:
                try:
                    image = _as_rows(image, found[index].path, counts[index] if counts else 1)
                except DataError as exc:
                    error = exc
            if error is not None:
                if strict:
                    raise error
                first_error = first_error or error
                skipped.append((index, failure_reason(error)))
            else:
                target[row:row + len(image)] = image  # rows stay in input order, skipped files leave no hole
                row += len(image)
                good.append(index)
                used.append(len(image))
            if progress:
                progress(index + 1, len(found))
    if not good:
        raise DataError(f"none of the {len(found)} images could be read; the first: {first_error}")
    return good, skipped, used


# Building the training cache decodes every image once, with nothing else to overlap: processes, not
# threads, because PIL's per-image Python holds the GIL and extra threads made small images no faster.
PROCESS_MIN_IMAGES = 512  # below this, starting the workers costs more than it saves
_JOB: tuple | None = None  # (paths, decode, target, first rows, counts) for forked workers: inherited, never pickled


def use_processes(count: int, workers: int | None) -> bool:
    """Whether `build_cache` decodes in forked worker processes (Linux, several workers, enough images)."""
    forkable = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    return forkable and (workers or default_workers()) > 1 and count >= PROCESS_MIN_IMAGES


def _shared_empty(count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """An uninitialised uint8 (N, C, S, S) tensor in anonymous shared memory: forked workers write into it.
    (Not /dev/shm, which containers often cap at 64 MB.)"""
    buffer = mmap.mmap(-1, max(1, count * _row_bytes(shape)))
    return torch.frombuffer(buffer, dtype=torch.uint8)[: count * _row_bytes(shape)].view(count, *shape)


def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    torch.set_num_threads(1)  # as torch's DataLoader workers do: no OpenMP in a forked child


def _decode_rows(bounds: tuple[int, int]) -> list[tuple[int, str, str]]:
    """In a worker: decode images [start, stop) into their rows of the shared target; return (index, reason,
    message) failures."""
    paths, decode, target, starts, counts = _JOB
    failures = []
    for index in range(*bounds):
        try:
            rows = _as_rows(decode(paths[index]), paths[index], counts[index])
            target[starts[index]:starts[index] + len(rows)] = rows
        except DataError as exc:
            failures.append((index, failure_reason(exc), str(exc)))
    return failures


def _fill_in_processes(found: Sequence[FoundImage], decode: Callable[[Path], torch.Tensor],
                       counts: list[int] | None, target: torch.Tensor, *, workers: int, strict: bool,
                       progress: Callable[[int, int], None] | None,
                       ) -> tuple[list[int], list[tuple[int, str]], list[int]]:
    """`_fill` on forked workers, each decoding runs of images into their rows in place; then the rows of the
    images decoded are closed up."""
    global _JOB
    chunk = max(16, min(256, len(found) // (8 * workers) or 16))
    bounds = [(start, min(start + chunk, len(found))) for start in range(0, len(found), chunk)]
    failed: dict[int, str] = {}
    first_error: str | None = None
    counts = counts or [1] * len(found)
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    _JOB = ([item.path for item in found], decode, target, starts, counts)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start) as pool:
            for (_, stop), failures in zip(bounds, pool.imap(_decode_rows, bounds)):  # in order: strict stops first
                if failures and strict:
                    raise DataError(failures[0][2])
                for index, reason, message in failures:
                    failed[index] = reason
                    first_error = first_error or message
                if progress:
                    progress(stop, len(found))
    finally:
        _JOB = None
    good = [i for i in range(len(found)) if i not in failed]
    if not good:
        raise DataError(f"none of the {len(found)} images could be read; the first: {first_error}")
    row = 0
    for index in good:  # close the gaps of skipped files; rows keep input order, and only ever move up
        if row != starts[index]:
            target[row:row + counts[index]] = target[starts[index]:starts[index] + counts[index]].clone()
        row += counts[index]
    return good, sorted(failed.items()), [counts[i] for i in good]


def _allocate(path: str | os.PathLike, size: int) -> None:
    """Give a file `size` bytes up front, so a full disk fails here and not as SIGBUS in a mapping."""
    with open(path, "r+b") as handle:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # the filesystem cannot; just size it
                    raise
        handle.truncate(size)


def _map(path: str | os.PathLike, count: int, shape: tuple[int, int, int], *, shared: bool) -> torch.Tensor:
    """Memory-map `count` rows of `shape`; private (copy-on-write) unless `shared`."""
    flat = torch.from_file(os.fspath(path), shared=shared, size=count * _row_bytes(shape), dtype=torch.uint8)
    return flat.view(count, *shape)  # (N, C, S, S)


def _build_mapped(found: Sequence[FoundImage], shape: tuple[int, int, int], rows: int, fill: Callable, *,
                  cache_dir: Path | None, key: str | None, tiled: bool) -> ImageCache:
    """Decode straight into a memory-mapped file of `rows` rows: the cache file itself, or a deleted
    temporary file. `tiled`: images may have several rows (the `patches` fit), recorded in the index."""
    total = rows * _row_bytes(shape)
    if cache_dir is None or key is None:
        fd, tmp = tempfile.mkstemp(prefix="vaetool-cache-", suffix=".u8")
        os.close(fd)
        try:
            _allocate(tmp, total)
            images = _map(tmp, rows, shape, shared=True)
        finally:
            with contextlib.suppress(OSError):  # POSIX: the mapping keeps the data, the space goes with it
                os.unlink(tmp)
        good, skipped, used = fill(images)
        images = images[:sum(used)]
    else:
        _make_dir(cache_dir)
        data_file = cache_dir / f"{key}.u8"
        with atomic_path(data_file, force=True) as tmp:
            _allocate(tmp, total)
            good, skipped, used = fill(_map(tmp, rows, shape, shared=True))  # unmapped on return
            os.truncate(tmp, sum(used) * _row_bytes(shape))
        _write_index(cache_dir, key, shape, good, skipped, used if tiled else None)
        images = _map(data_file, sum(used), shape, shared=False)
    return _cache(found, images, good, skipped, used if tiled else None, on_disk=True, reused=False)


# -------------------------------------------------------------------------------------- on disk


def cache_key(found: Sequence[FoundImage], *, image_size: int, channels: int, background: Background,
              fit: str) -> str:
    """A name for the decoded cache of these files (paths, sizes, mtimes) under these options."""
    import PIL

    options = {"version": CACHE_VERSION, "pillow": PIL.__version__, "image_size": image_size, "channels": channels,
               "fit": fit, "background": list(background) if not isinstance(background, int) else background}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for item in found:
        path = os.path.abspath(item.path)
        try:
            st = os.stat(path)
            signature = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            signature = "missing"
        digest.update(f"\n{path}\0{signature}".encode("utf-8", "surrogateescape"))
    return "images-" + digest.hexdigest()[:32]


def _make_dir(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the cache folder {cache_dir}: {exc.strerror or exc}; "
                          f"pass another --cache-dir") from None


def _write_index(cache_dir: Path, key: str, shape: tuple[int, int, int], good: list[int],
                 skipped: list[tuple[int, str]], counts: list[int] | None) -> None:
    # Written after the data file, so an index on disk always describes a complete data file.
    rows = sum(counts) if counts is not None else len(good)
    index = {"version": CACHE_VERSION, "key": key, "shape": [rows, *shape], "good": good,
             "skipped": [[i, reason] for i, reason in skipped], **({} if counts is None else {"counts": counts})}
    with atomic_path(cache_dir / f"{key}.json", force=True) as tmp:
        tmp.write_text(json.dumps(index))


def _save(cache_dir: Path, key: str, images: torch.Tensor, good: list[int], skipped: list[tuple[int, str]],
          counts: list[int] | None) -> None:
    _make_dir(cache_dir)
    with atomic_path(cache_dir / f"{key}.u8", force=True) as tmp:
        images.contiguous().numpy().tofile(tmp)
    _write_index(cache_dir, key, tuple(images.shape[1:]), good, skipped, counts)


def _reuse(cache_dir: Path, key: str, found: Sequence[FoundImage], shape: tuple[int, int, int], *,
           strict: bool) -> ImageCache | None:
    """Map a previous run's cache with this key, or None when there is no complete, matching one."""
    data_file = cache_dir / f"{key}.u8"
    try:
        index = json.loads((cache_dir / f"{key}.json").read_text())
        good = [int(i) for i in index["good"]]
        skipped = [(int(i), str(reason)) for i, reason in index["skipped"]]
        counts = [int(n) for n in index["counts"]] if "counts" in index else None
        rows = sum(counts) if counts is not None else len(good)
        complete = (index["version"] == CACHE_VERSION and index["key"] == key
                    and index["shape"] == [rows, *shape] and good
                    and (counts is None or len(counts) == len(good) and min(counts) > 0)
                    and all(0 <= i < len(found) for i in good + [i for i, _ in skipped])
                    and data_file.stat().st_size == rows * _row_bytes(shape))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not complete:
        return None
    if strict and skipped:
        i, reason = skipped[0]
        raise DataError(f"{found[i].path}: {reason}")
    images = _map(data_file, rows, shape, shared=False)
    return _cache(found, images, good, skipped, counts, on_disk=True, reused=True)
