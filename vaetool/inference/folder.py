"""The one folder-in/folder-out layer: inputs to mirrored outputs, skip-existing, never over an input, the writer.

Every command that writes a file per input (or per latent row) plans its outputs here, checks them
here before any model time is spent, and writes them through the one background `Writer`, which
reports each file as `Written` or `Failed` in submission order. `Outcome` is built from those
events, so what a command returns and what it reported cannot disagree.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError, OutputError, StorageError, VaetoolError
from ..events import Callback, Event, Failed, Progress, Skipped, Written, ignore
from ..io.atomic import check_writable_dirs
from ..io.find import FoundImage, find_images, select_images
from ..io.write import write_image


@dataclass
class Outcome:
    """What a batch command did: files written, skipped (already there) and failed (input, reason)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def recorder(self, callback: Callback) -> Callback:
        """A callback that records every Written, Skipped and Failed here, then passes each event on."""
        def record(event: Event) -> None:
            if isinstance(event, Written):
                self.written.append(Path(event.output))
            elif isinstance(event, Skipped):
                self.skipped.append(Path(event.output))
            elif isinstance(event, Failed):
                self.failed.append((event.input, event.reason))
            callback(event)
        return record

    @property
    def images_per_s(self) -> float:
        """Files written per second of the run."""
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0


def counting(callback: Callback, *, total: int, done: int = 0) -> Callback:
    """Pass events on, with a `Progress` after each file that is finished (written, skipped or failed)."""
    count = [done]

    def count_each(event: Event) -> None:
        callback(event)
        if isinstance(event, (Written, Skipped, Failed)):
            count[0] += 1
            callback(Progress(count[0], total))
    return count_each


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Task:
    """One output file, and the input it comes from when there is one."""

    output: Path
    source: FoundImage | None = None
    redo: bool = False  # an empty leftover under the output name (a crash mid-write): write it again

    @property
    def input(self) -> str | None:
        """The input file's path as text, for events."""
        return str(self.source.path) if self.source is not None else None


def output_path(relative: Path, out_dir: Path, *, ext: str | None = None, suffix: str = "") -> Path:
    """OUT_DIR / relative folders / stem + suffix + (the new extension, or the input's own)."""
    extension = ("." + ext.lstrip(".").lower()) if ext else relative.suffix
    return out_dir / relative.parent / f"{relative.stem}{suffix}{extension}"


def plan_outputs(found: Sequence[FoundImage], out_dir: Path, *, ext: str | None = None,
                 suffix: str = "") -> tuple[list[Task], int]:
    """Map each input to its output; returns the tasks and how many names had to be made distinct.

    Names come from the inputs' relative paths, so they are distinct unless `ext` maps two inputs
    (`a.png`, `a.jpg`) to one name: the later ones then keep their old extension in the stem (`a_jpg.png`).
    """
    tasks, used, renamed = [], set(), 0
    for item in found:
        target = output_path(item.relative, out_dir, ext=ext, suffix=suffix)
        if os.path.normcase(target) in used:
            old = item.relative.suffix.lstrip(".").lower() or "noext"
            target = target.with_name(f"{item.relative.stem}{suffix}_{old}{target.suffix}")
            k = 1
            while os.path.normcase(target) in used:
                k += 1
                target = target.with_name(f"{item.relative.stem}{suffix}_{old}-{k}{target.suffix}")
            renamed += 1
        used.add(os.path.normcase(target))
        tasks.append(Task(target, item))
    return tasks, renamed


def check_not_inside(out_dir: Path, inputs: Sequence[str | os.PathLike], *, force: bool) -> None:
    """Refuse an output folder equal to or inside an input folder (outputs would be read back as inputs)."""
    out = Path(out_dir).resolve()
    for item in inputs:
        if str(item) == "-":
            continue
        folder = Path(item).resolve()
        if not force and folder.is_dir() and (out == folder or folder in out.parents):
            raise OutputError(f"output folder {out_dir} is inside input folder {item}; choose another -o "
                              f"or pass --force (inputs are never overwritten)")


def check_no_input_overwritten(tasks: Sequence[Task]) -> None:
    """Whatever the flags, an output may never be an input file."""
    sources = {os.path.realpath(t.source.path): t.source.path for t in tasks if t.source is not None}
    for task in tasks:
        source = sources.get(os.path.realpath(task.output))
        if source is not None:
            raise OutputError(f"{task.output} would overwrite the input {source}; choose another -o "
                              f"(or change the names with --ext or --suffix where the command has them)")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def split_existing(tasks: Sequence[Task], *, skip_existing: bool, force: bool, callback: Callback) -> list[Task]:
    """The tasks still to do. With `skip_existing`, an output that exists and is not empty is `Skipped`
    (an empty one was cut off by a crash and is written again). Otherwise existing outputs are one error
    before any work, in every command, unless `force`."""
    if skip_existing:
        todo = []
        for task in tasks:
            size = _size(task.output)
            if size:
                callback(Skipped(str(task.output), task.input))
            else:
                todo.append(task if size is None else dataclasses.replace(task, redo=True))
        return todo
    if not force:
        existing = [t for t in tasks if os.path.lexists(t.output)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputError(f"{existing[0].output} already exists{more}; pass --skip-existing to resume "
                              f"or --force to overwrite")
    return list(tasks)


def prepare_outputs(tasks: Sequence[Task], *, skip_existing: bool, force: bool, callback: Callback) -> list[Task]:
    """Every check before the work: never over an input, existing outputs, a writable folder for each output."""
    check_no_input_overwritten(tasks)
    todo = split_existing(tasks, skip_existing=skip_existing, force=force, callback=callback)
    check_writable_dirs(t.output for t in todo)  # a read-only or misplaced -o is one error, before any work
    return todo


# -------------------------------------------------------------------------------------------- writing

Pixels = torch.Tensor | Callable[[], torch.Tensor]  # the image, or work that makes it on a writer thread


@dataclass
class _Job:
    task: Task
    pixels: Pixels
    alpha: torch.Tensor | None
    bit_depth: int
    force: bool
    weight: int


class Writer:
    """Writes images on background threads, reporting each as Written or Failed in submission order.

    Images go to the threads in runs of `chunk`: one task per small image cost more in thread
    hand-offs than encoding it. Memory stays bounded: once more than `max_weight` (images, or any
    measure given per image) await writing, and more than `min_jobs` images, the oldest is waited for.
    A full or read-only disk (StorageError) stops the batch: `submit` and `close` raise it.
    """

    def __init__(self, callback: Callback, *, force: bool = False, workers: int = 2, chunk: int = 16,
                 max_weight: int = 256, min_jobs: int = 0, write: Callable[..., Path] = write_image) -> None:
        self.callback, self.force, self.write = callback, force, write
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vaetool-write")
        self.pending: collections.deque[tuple[list[_Job], futures.Future]] = collections.deque()
        self.queued: list[_Job] = []  # the run being filled
        self.chunk, self.max_weight, self.min_jobs = max(1, chunk), max_weight, min_jobs
        self.weight, self.jobs = 0, 0  # what the pending runs hold
        self.storage_error: StorageError | None = None

    def submit(self, task: Task, pixels: Pixels, *, alpha: torch.Tensor | None = None, bit_depth: int = 8,
               weight: int = 1) -> None:
        """Queue one image for `task`; a callable `pixels` is run on the writer thread first."""
        if self.storage_error is not None:
            raise self.storage_error
        self.queued.append(_Job(task, pixels, alpha, bit_depth, self.force or task.redo, weight))
        if len(self.queued) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Hand the images queued so far to the threads; report those finished."""
        if self.queued:
            jobs, self.queued = self.queued, []
            self.pending.append((jobs, self.pool.submit(self._write_all, jobs)))
            self.weight += sum(job.weight for job in jobs)
            self.jobs += len(jobs)
        self._collect(final=False)

    def _write_all(self, jobs: list[_Job]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        for job in jobs:
            try:
                pixels = job.pixels() if callable(job.pixels) else job.pixels
                job.pixels = None  # free the image as soon as it is written
                self.write(job.task.output, pixels, alpha=job.alpha, bit_depth=job.bit_depth, force=job.force,
                           durable=False)  # not fsynced: --skip-existing rewrites what a power cut empties
                errors.append(None)
            except (VaetoolError, OSError) as exc:
                errors.append(exc)
        return errors

    def _full(self) -> bool:
        return self.jobs > self.min_jobs and self.weight > self.max_weight

    def _collect(self, *, final: bool) -> None:
        while self.pending and (final or self.pending[0][1].done() or self._full()):
            jobs, future = self.pending.popleft()
            self.weight -= sum(job.weight for job in jobs)
            self.jobs -= len(jobs)
            for job, error in zip(jobs, future.result()):
                self._report(job.task, error)

    def _report(self, task: Task, error: BaseException | None) -> None:
        if isinstance(error, StorageError):
            self.storage_error = self.storage_error or error
        elif error is not None:
            reason = str(error) or type(error).__name__
            if isinstance(error, OSError) and not isinstance(error, VaetoolError):
                reason = f"cannot write {task.output}: {error.strerror or reason}"
            self.callback(Failed(task.input or str(task.output), reason))
        else:
            self.callback(Written(str(task.output), task.input))

    def close(self) -> None:
        """Wait for every queued write (reporting each); then raise a storage error if one stopped the batch."""
        try:
            if self.queued:
                self.flush()
            self._collect(final=True)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.storage_error is not None:
            raise self.storage_error

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.close()
        elif issubclass(kind, VaetoolError):  # the writes under way are still reported, then that error goes on
            with contextlib.suppress(VaetoolError):
                self.close()
        else:  # Ctrl-C: writes already started finish (each is atomic), queued ones are dropped
            self.pool.shutdown(wait=True, cancel_futures=True)


def tasks_for(paths: Iterable[Path]) -> list[Task]:
    """Tasks for outputs that come from no input file (decoded latents, samples, frames)."""
    return [Task(Path(p)) for p in paths]


def select_inputs(inputs: Sequence[str | os.PathLike], *, include: Sequence[str], exclude: Sequence[str],
                  stdin=None, callback: Callback = ignore) -> list[FoundImage]:
    """The images under `inputs` that `--include`/`--exclude` keep, found once; the commands take the list
    as their inputs (relative paths kept, so output trees still mirror the input tree)."""
    found = find_images(inputs, stdin=stdin, callback=callback)
    kept = select_images(found, include=include, exclude=exclude)
    if not kept:
        rules = " ".join([*(f"--include {p!r}" for p in include), *(f"--exclude {p!r}" for p in exclude)])
        raise DataError(f"none of the {len(found)} images found matches {rules}; patterns match the path under "
                        f"the input folder or the file name, e.g. '*.png' or 'raw/*'")
    return kept
