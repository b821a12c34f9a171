"""The training images: decoded once into the uint8 cache (rank 0 decodes, the others map it), and the seeded split."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, TrainConfig
from ..events import Callback, Failed, Progress, Started, Warning
from ..io import cache as image_cache
from ..io.find import FoundImage, find_images
from .distributed import World, barrier


def paths_from_stdin(stdin) -> list[str]:
    """The image paths listed on stdin (one per line, as `find` prints them), for `vaetool train -`."""
    return [str(found.path) for found in find_images(["-"], stdin=stdin)]


def default_cache_memory() -> int:
    """Half the memory available now: above this the decoded cache is memory-mapped from disk."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30


class _CacheProgress:
    """The cache build's progress(done, total) as events: Started once, then Progress."""

    def __init__(self, emit: Callback) -> None:
        self.emit = emit
        self.started = False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.started = True
            self.emit(Started("decode", total, "images"))
        self.emit(Progress(done, total))


def load_cache(found: Sequence[FoundImage], *, model_config: ModelConfig, world: World, emit: Callback, strict: bool,
               cache_dir: str | Path | None, cache_memory: int | None, workers: int | None,
               patches: bool = False) -> Any:
    """Decode every image once into the uint8 cache (`patches`: cut into tiles at its own resolution, else
    resized); each unreadable file is one Failed event."""
    fit = "patches" if patches else "crop"
    if world.distributed and cache_dir is None:
        cache_dir = Path(os.environ.get("VAETOOL_CACHE_DIR", Path.home() / ".cache" / "vaetool"))
    progress = _CacheProgress(emit)
    cache = None
    for turn in (0, 1):  # rank 0 decodes; then the others map the same on-disk cache instead of decoding again
        if (turn == 0) == world.is_main:
            cache = image_cache.build_cache(
                found, image_size=model_config.image_size, channels=model_config.channels, fit=fit,
                cache_dir=Path(cache_dir) if cache_dir else None, strict=strict, workers=workers,
                memory_limit=cache_memory if cache_memory is not None else default_cache_memory(),
                progress=progress, on_warning=lambda message: emit(Warning(message)))
        barrier(world)
    for path, reason in cache.skipped:
        emit(Failed(str(path), reason))
    return cache


@dataclass(frozen=True)
class Split:
    """Which cached images train and which validate, and the batch each process takes per step."""

    train_index: torch.Tensor  # (N_train,) rows of the image cache
    val_index: torch.Tensor  # (N_val,)
    batch: int  # per process
    global_batch: int  # batch x processes
    steps_per_epoch: int


def split_data(count: int, config: TrainConfig, world: World, *, warn: Callable[[str], None],
               groups: Sequence[int] | None = None) -> Split:
    """A permutation seeded by `config.seed` holds out `val_fraction` of the images (at least one from 4 on).

    `groups`: the consecutive rows of each image (the tiles of `--patches`; `count` is then their sum). Whole
    images are held out, so no tile of a validation image is trained on.
    """
    images = len(groups) if groups is not None else count
    order = torch.randperm(images, generator=torch.Generator().manual_seed(config.seed))
    n_val = int(images * config.val_fraction)
    if n_val == 0 and config.val_fraction > 0 and images >= 4:
        n_val = 1
    val_index, train_index = order[:n_val], order[n_val:]
    if groups is not None:
        starts = torch.tensor([0, *groups[:-1]]).cumsum(0)
        rows_of = lambda picked: torch.cat([torch.arange(int(starts[i]), int(starts[i]) + groups[i])  # noqa: E731
                                            for i in picked.tolist()] or [torch.zeros(0, dtype=torch.long)])
        val_index, train_index = rows_of(val_index), rows_of(train_index)
    n_train = len(train_index)
    what = "training patches" if groups is not None else "training images"
    batch = min(config.batch_size, max(1, n_train // world.size))
    if batch < config.batch_size:
        warn(f"only {n_train} {what}: batch size lowered from {config.batch_size} to {batch} per process")
    global_batch = batch * world.size
    return Split(train_index, val_index, batch, global_batch, max(1, n_train // global_batch))
