"""Reconstructing folders of images through a model, from the posterior means, mirroring the input tree.

A fixed-size model (the vector family) sees each image cropped and resized to its image size, and its
reconstruction is written at that size in the model's channels. A model that takes any size (spatial,
hierarchical) sees each image whole at its own size, reflect-padded to the model's multiple and cropped
back, through the denoiser's pipeline (`denoise.py`): the output keeps the input's size, gray or colour,
alpha and 16-bit depth where the format holds them; tiles only where an image is too large for memory.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..events import Callback, Progress, Saved, Started, ignore
from ..io.batches import iter_batches
from ..io.decode import match_channels, to_float
from ..io.find import find_images
from ..io.pool import default_workers
from ..io.write import quantize, save_grid
from ..runtime import autocast, resolve_precision
from .denoise import Pipeline
from .folder import Outcome, Task, Writer, check_not_inside, counting, plan_outputs, prepare_outputs
from .load import model_device
from .tiledenoise import ModelRunner, TileSpec, check_options

Inputs = Sequence[str | os.PathLike]


def reconstruct_folder(checkpoint: Checkpoint, inputs: Inputs, out_dir: Path, *, batch_size: int,
                       ext: str | None = None, force: bool = False, skip_existing: bool = False,
                       grid: Path | None = None, grid_count: int = 16, tile: TileSpec = "auto",
                       overlap: float = 0.25, workers: int | None = None, precision: str = "auto",
                       stdin: TextIO | None = None, callback: Callback = ignore) -> Outcome:
    """Reconstruct every image from its posterior mean into OUT_DIR, mirroring the input tree.

    `tile` and `overlap` apply to a model that takes any size: `auto` runs each image whole up to a
    memory bound and in blended tiles above it, `off` always whole, N in tiles of N px. With `grid`,
    the first `grid_count` originals are also written above their reconstructions in one image.
    `precision` as `resolve_precision` reads it: `auto` is float32 on CPUs, so outputs match between
    machines; `bf16` is faster on CPUs with AMX, at a level of difference in some pixels (BENCHMARKS.md).
    """
    started, outcome = time.monotonic(), Outcome()
    callback = outcome.recorder(callback)
    check_options(overlap=overlap, strength=1.0, batch_size=batch_size)
    amp = resolve_precision(precision, model_device(checkpoint))
    check_not_inside(out_dir, inputs, force=force)
    found = find_images(inputs, stdin=stdin, callback=callback)
    callback(Started("reconstruct", len(found)))
    tasks, _ = plan_outputs(found, out_dir, ext=ext)
    todo = prepare_outputs(tasks, skip_existing=skip_existing, force=force, callback=callback)
    if checkpoint.model.size_multiple is None:
        pairs = _resized(checkpoint, todo, done=len(tasks) - len(todo), total=len(tasks), batch_size=batch_size,
                         force=force, keep=grid_count if grid is not None else 0, amp=amp, callback=callback)
    else:
        pairs = _whole(checkpoint, todo, done=len(tasks) - len(todo), total=len(tasks), batch_size=batch_size,
                       tile=tile, overlap=overlap, force=force, keep=grid_count if grid is not None else 0,
                       workers=workers, amp=amp, callback=callback)
    if grid is not None and pairs:
        originals, recons = zip(*pairs)
        written = save_grid(grid, torch.cat([torch.stack(originals), torch.stack(recons)]), nrow=len(originals),
                            force=force)
        callback(Saved(str(written), "grid"))
    outcome.seconds = time.monotonic() - started
    return outcome


def _resized(checkpoint: Checkpoint, todo: list[Task], *, done: int, total: int, batch_size: int, force: bool,
             keep: int, amp: torch.dtype | None, callback: Callback) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed-size path: images fitted to the model's size, reconstructed in batches; the first `keep` pairs."""
    cfg, model = checkpoint.config, checkpoint.model
    device = model_device(checkpoint)
    by_source = {t.source: t for t in todo}
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with Writer(callback, force=force) as writer:
        for items, batch, failures in iter_batches(list(by_source), image_size=cfg.image_size, channels=cfg.channels,
                                                   batch_size=batch_size, callback=callback):
            done += len(items) + len(failures)
            if items:
                with torch.inference_mode(), autocast(device, amp):
                    x = to_float(batch, device).contiguous(memory_format=torch.channels_last)  # (B, C, S, S)
                    pixels = model.mean_image(model.decode(model.encode(x).mode())).float().cpu()
                for item, image in zip(items, quantize(pixels)):
                    writer.submit(by_source[item], image)
                pairs += list(zip(batch.float() / 255.0, pixels))[: max(0, keep - len(pairs))]
            callback(Progress(done, total))
    return pairs


def _whole(checkpoint: Checkpoint, todo: list[Task], *, done: int, total: int, batch_size: int, tile: TileSpec,
           overlap: float, force: bool, keep: int, workers: int | None, amp: torch.dtype | None,
           callback: Callback) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The any-size path: each image at its own size through the denoiser's pipeline at full strength."""
    run = ModelRunner(checkpoint.model, amp_dtype=amp)
    side, max_pixels = run.tiling(tile)
    thumbs = _Thumbnails({t.output: i for i, t in enumerate(todo[:keep])}, size=checkpoint.config.image_size,
                         channels=checkpoint.config.channels)
    pipeline = Pipeline(run, tile=side, overlap=overlap, strength=1.0, batch_size=batch_size,
                        workers=workers or default_workers(), callback=counting(callback, total=total, done=done),
                        max_pixels=max_pixels, keep=thumbs if keep else None)
    pipeline.process(todo, force=force)
    return thumbs.pairs()


class _Thumbnails:
    """Keeps the first images' (input, output) pairs at the model's size for the grid; called on writer threads."""

    def __init__(self, wanted: dict[Path, int], *, size: int, channels: int) -> None:
        self.wanted, self.size, self.channels = wanted, size, channels
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lock = threading.Lock()

    def __call__(self, task: Task, original: torch.Tensor, output: torch.Tensor) -> None:
        index = self.wanted.get(task.output)
        if index is not None:
            pair = (self._thumb(original), self._thumb(output))
            with self.lock:
                self.kept[index] = pair

    def _thumb(self, image: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return match_channels(small, self.channels)[0].clamp(0.0, 1.0)  # (C, S, S)

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.kept[i] for i in sorted(self.kept)]
