"""Streaming decoded images in batches for inference: input order, bounded memory, failures reported."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError
from ..events import Callback, Failed, ignore
from .decode import Background, failure_reason, make_decoder
from .find import FoundImage
from .pool import map_data

Batch = tuple[list[FoundImage], torch.Tensor, list[tuple[FoundImage, str]]]


def iter_batches(found: Sequence[FoundImage], *, image_size: int, channels: int, batch_size: int,
                 workers: int | None = None, background: Background = (255, 255, 255), fit: str = "crop",
                 prefetch: int = 2, callback: Callback = ignore) -> Iterator[Batch]:
    """Stream (decoded items, uint8 (B, C, S, S), failures as (item, reason)) batches in input order.

    Decoding runs on worker threads at most `prefetch` batches ahead, so memory stays bounded for
    any number of files. Each file that cannot be decoded is also reported as `Failed`. A batch
    whose files all failed has a (0, C, S, S) tensor.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")
    decode = make_decoder(image_size=image_size, channels=channels, background=background, fit=fit)
    # Options are checked above, at the call; the decoding starts with the first batch taken.
    return _batches(found, lambda item: decode(item.path), batch_size=batch_size, workers=workers,
                    window=max(1, prefetch) * batch_size, shape=(channels, image_size, image_size),
                    callback=callback)


def _batches(found: Sequence[FoundImage], decode, *, batch_size: int, workers: int | None, window: int,
             shape: tuple[int, int, int], callback: Callback) -> Iterator[Batch]:
    good: list[FoundImage] = []
    tensors: list[torch.Tensor] = []
    failures: list[tuple[FoundImage, str]] = []
    with contextlib.closing(map_data(decode, found, workers=workers, window=window)) as results:
        for item, image, error in results:
            if error is not None:
                failures.append((item, failure_reason(error)))
                callback(Failed(str(item.path), failures[-1][1]))
            else:
                good.append(item)
                tensors.append(image)
            if len(good) + len(failures) == batch_size:
                yield good, _stack(tensors, shape), failures
                good, tensors, failures = [], [], []
    if good or failures:
        yield good, _stack(tensors, shape), failures


def _stack(tensors: list[torch.Tensor], shape: tuple[int, int, int]) -> torch.Tensor:
    if not tensors:
        return torch.empty((0, *shape), dtype=torch.uint8)
    return torch.stack(tensors)  # (B, C, S, S)
