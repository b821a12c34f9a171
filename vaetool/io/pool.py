"""Worker threads for file work: the default worker count and an ordered, bounded map over items."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..errors import DataError

T = TypeVar("T")
R = TypeVar("R")
# Most items per thread task: one task per image cost more in hand-offs than a small PNG's decode.
CHUNK = 16


def default_workers() -> int:
    """Threads for decoding and writing: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int,
                window: int) -> Iterator[tuple[T, Future]]:
    """Run `fn` over `items` on threads, at most `window` in flight, yielding (item, future) in input order.

    Unlike `Executor.map`, items are submitted as results are taken, so memory stays bounded for
    any number of items; closing the generator cancels what has not started.
    """
    pool = ThreadPoolExecutor(max_workers=workers)
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                break
        while pending:
            head = pending.popleft()
            for item in source:  # refill one slot, keeping memory bounded
                pending.append((item, pool.submit(fn, item)))
                break
            yield head
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def map_data(fn: Callable[[T], R], items: Sequence[T], *, workers: int | None,
             window: int) -> Iterator[tuple[T, R | None, DataError | None]]:
    """(item, fn(item), None) or (item, None, the DataError it raised) for each item, in order, on threads.

    Items go to the threads in chunks of up to `CHUNK`, at most about `window` items in flight.
    """
    def run_all(chunk: Sequence[T]) -> list[tuple[R | None, DataError | None]]:
        results: list[tuple[R | None, DataError | None]] = []
        for item in chunk:
            try:
                results.append((fn(item), None))
            except DataError as exc:
                results.append((None, exc))
        return results

    workers = workers or default_workers()
    size = max(1, min(CHUNK, window // (2 * workers)))  # at least two tasks per thread in the window
    chunks = (items[start:start + size] for start in range(0, len(items), size))
    futures = ordered_map(run_all, chunks, workers=workers, window=max(2 * workers, window // size))
    with contextlib.closing(futures):  # stopping early cancels the work not yet started
        for chunk, future in futures:
            for item, (value, error) in zip(chunk, future.result()):
                yield item, value, error
