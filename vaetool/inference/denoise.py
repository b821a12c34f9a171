"""Denoising images of any size with a VAEFamily: tiles from many images batched together, streamed decode and write."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ..io import images
from ..io.atomic import check_writable_dirs
from ..checkpoint import Checkpoint, load_model
from ..errors import ConfigError, OutputError, StorageError, VaetoolError
from ..models.base import VAEFamily
from ..runtime import prepare, resolve_device, resolve_precision

from .tiledenoise import (Layout, ModelRunner, TileSpec, check_options, denoise_image, join_outputs,  # noqa: F401
                          mix, resolve_tile, split_image)

Callback = Callable[[str, dict[str, Any]], None]


# ----------------------------------------------------------------------------------- output planning


@dataclass(frozen=True)
class Task:
    """One input file and where its denoised image goes."""

    source: images.FoundImage
    output: Path
    redo: bool = False  # an empty leftover under the output name (a crash mid-write): write it again


def output_path(relative: Path, out_dir: Path, *, ext: str | None = None, suffix: str = "") -> Path:
    """OUT_DIR / relative folders / stem + suffix + (the new extension, or the input's own)."""
    extension = ("." + ext.lstrip(".").lower()) if ext else relative.suffix
    return out_dir / relative.parent / f"{relative.stem}{suffix}{extension}"


def plan_outputs(found: Sequence[images.FoundImage], out_dir: Path, *, ext: str | None = None,
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
        tasks.append(Task(item, target))
    return tasks, renamed


def check_output_dir(out_dir: Path, inputs: Sequence[str | os.PathLike], *, force: bool) -> None:
    """Refuse an output folder equal to or inside an input folder, unless `force`."""
    out = Path(out_dir).resolve()
    for item in inputs:
        if str(item) == "-":
            continue
        folder = Path(item).resolve()
        if not force and folder.is_dir() and (out == folder or folder in out.parents):
            raise OutputError(f"output folder {out_dir} is inside input folder {item}; choose another -o "
                              f"or pass --force (inputs are never overwritten)")


def _check_no_input_overwritten(tasks: Sequence[Task]) -> None:
    """Whatever the flags, an output may never be an input file."""
    sources = {os.path.realpath(t.source.path): t.source.path for t in tasks}
    for task in tasks:
        if os.path.realpath(task.output) in sources:
            raise OutputError(f"{task.output} would overwrite the input {sources[os.path.realpath(task.output)]}; "
                              f"choose another -o, or add --suffix or --ext")


def _split_existing(tasks: list[Task], *, skip_existing: bool, force: bool) -> tuple[list[Task], int]:
    """(tasks still to do, how many are skipped); existing outputs need --skip-existing or --force."""
    existing = [t for t in tasks if t.output.exists()]
    if not existing:
        return tasks, 0
    if skip_existing:
        done = {id(t) for t in existing if _has_content(t.output)}
        todo = [dataclasses.replace(t, redo=True) if t.output.exists() else t for t in tasks if id(t) not in done]
        return todo, len(done)
    if not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0].output} already exists{more}; pass --skip-existing to resume "
                          f"or --force to overwrite")
    return tasks, 0


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _check_ext(ext: str | None) -> None:
    if not ext:
        return
    try:
        fmt = images.format_for_path(Path("x." + ext.lstrip(".")))
    except OutputError:
        fmt = None
    if fmt not in ("PNG", "JPEG", "TIFF", "WEBP", "BMP", "PPM", "GIF"):
        raise ConfigError(f"--ext {ext} is not an image format vaetool writes; use png, jpg, tif or webp")


# --------------------------------------------------------------------------------- the folder engine


@dataclass
class DenoiseSummary:
    """What a batch run did."""

    total: int  # images found
    done: int
    skipped: int  # outputs that already existed (--skip-existing)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, one-line message)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Job:
    """An image on its way through the pipeline."""

    task: Task
    image: images.DecodedImage
    layout: Layout
    inputs: torch.Tensor | None  # (N, Cm, S, S) model inputs, dropped once they have all run
    outputs: list[torch.Tensor] = field(default_factory=list)
    received: int = 0


class _Batcher:
    """Packs model inputs from many images into batches of exactly `size` and routes the outputs back."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        self.run, self.size = run, size
        self.queue: deque[tuple[_Job, int]] = deque()  # (job, first row not yet queued into a batch)
        self.queued = 0

    def add(self, job: _Job) -> list[_Job]:
        """Queue a job's inputs; run every full batch; return the jobs now complete."""
        self.queue.append((job, 0))
        self.queued += job.layout.count
        finished: list[_Job] = []
        while self.queued >= self.size:
            finished += self._run_one()
        return finished

    def flush(self) -> list[_Job]:
        """Run what is left as a last, smaller batch."""
        finished: list[_Job] = []
        while self.queued:
            finished += self._run_one()
        return finished

    def _run_one(self) -> list[_Job]:
        pieces, need = [], self.size
        while need and self.queue:
            job, start = self.queue[0]
            stop = min(job.layout.count, start + need)
            pieces.append((job, start, stop))
            if stop == job.layout.count:
                self.queue.popleft()
            else:
                self.queue[0] = (job, stop)
            need -= stop - start
        batch = torch.cat([job.inputs[a:b] for job, a, b in pieces])  # (B, Cm, S, S)
        out = self.run(batch)
        self.queued -= batch.shape[0]
        finished, offset = [], 0
        for job, a, b in pieces:
            job.outputs.append(out[offset: offset + b - a])
            offset += b - a
            job.received += b - a
            if job.received == job.layout.count:
                job.inputs = None  # free the inputs as soon as they have run
                finished.append(job)
        return finished


def _message(task: Task, exc: BaseException) -> str:
    """One line naming the input file and what went wrong."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, VaetoolError):
        text = exc.strerror or text
    return text if str(task.source.path) in text else f"{task.source.path}: {text}"


class _Pipeline:
    """Decode on threads -> batch tiles through the model on this thread -> blend and write on threads.

    Decodes run ahead and writes trail behind by about two batches of tiles (at least a few images),
    so the threads work while the model runs, and memory depends on the batch and the image sizes,
    never on how many files there are.
    """

    def __init__(self, run: ModelRunner, *, tile: int | None, overlap: float, strength: float, batch_size: int,
                 force: bool, workers: int, callback: Callback, summary: DenoiseSummary, total: int) -> None:
        self.run, self.tile, self.overlap, self.strength = run, tile, overlap, strength
        self.batch_size, self.force, self.workers = batch_size, force, workers
        self.callback, self.summary, self.total = callback, summary, total
        self.warned: set[str] = set()
        self.max_tiles = 2 * batch_size  # model inputs held ahead of the model, and again behind it
        self.min_images = 2 * workers + 2  # always enough images in flight to keep every thread busy
        self.tiles_seen, self.images_seen = 0, 0
        self.write_tiles = 0
        self.storage_error: StorageError | None = None  # a full or read-only disk stops the batch

    def process(self, tasks: Sequence[Task]) -> None:
        """Denoise every task, reporting each written or failed file in input order."""
        writes: deque[tuple[_Job, Future]] = deque()
        batcher = _Batcher(self.run, self.batch_size)
        readers = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vaetool-read")
        writers = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vaetool-write")
        try:
            for task, future in self._prefetch(tasks, readers):
                job = self._take(task, future)
                if job is not None:
                    self._submit(writes, writers, batcher.add(job))
                self._harvest(writes, final=False)
                if self.storage_error is not None:
                    break  # no new work; the writes already running still finish and are reported
            if self.storage_error is None:
                self._submit(writes, writers, batcher.flush())
            self._harvest(writes, final=True)
            if self.storage_error is not None:
                raise self.storage_error
        finally:
            # On Ctrl-C: decodes and writes already started finish (writes are atomic), queued ones are dropped.
            readers.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True, cancel_futures=True)

    def _prefetch(self, tasks: Sequence[Task], pool: ThreadPoolExecutor) -> Iterator[tuple[Task, Future]]:
        """(task, future of its _Job) in input order, with about `max_tiles` model inputs decoding ahead."""
        pending: deque[tuple[Task, Future]] = deque()
        source = iter(tasks)
        while True:
            # tiles per image so far estimates what the decodes in flight will give
            per_image = self.tiles_seen / self.images_seen if self.images_seen else 1.0
            while len(pending) < self.min_images or len(pending) * per_image < self.max_tiles:
                task = next(source, None)
                if task is None:
                    break
                pending.append((task, pool.submit(self._load, task)))
            if not pending:
                return
            yield pending.popleft()

    def _submit(self, writes: deque[tuple[_Job, Future]], pool: ThreadPoolExecutor, jobs: list[_Job]) -> None:
        for job in jobs:
            writes.append((job, pool.submit(self._finish, job)))
            self.write_tiles += job.layout.count

    def _load(self, task: Task) -> _Job:
        """On a worker thread: decode the file and cut it into model inputs."""
        images.format_for_path(task.output)  # an unwritable extension fails here, before any model time
        image = images.read_image(task.source.path)
        inputs, layout = split_image(image.pixels, model_size=self.run.size, model_channels=self.run.channels,
                                     tile=self.tile, overlap=self.overlap)
        return _Job(task, image, layout, inputs)

    def _take(self, task: Task, future: Future) -> _Job | None:
        try:
            job = future.result()
        except (VaetoolError, OSError) as exc:
            self._fail(task, exc)
            return None
        self.tiles_seen += job.layout.count
        self.images_seen += 1
        self._warn_once(job)
        return job

    def _finish(self, job: _Job) -> Path:
        """On a worker thread: blend the tiles, mix with the input by strength, write atomically."""
        denoised = join_outputs(torch.cat(job.outputs), job.layout)  # (C, H, W)
        job.outputs = []
        result = mix(denoised, job.image.pixels, self.strength)
        # Not fsynced, like the other folder commands: --skip-existing rewrites the empty files a power cut can leave.
        return images.write_image(job.task.output, result, alpha=job.image.alpha, bit_depth=job.image.bit_depth,
                                  force=self.force or job.task.redo, durable=False)

    def _harvest(self, writes: deque[tuple[_Job, Future]], *, final: bool) -> None:
        """Report finished writes in order; wait for the oldest while too many tiles await writing (or at the end)."""
        while writes and (final or writes[0][1].done() or self._writes_full(len(writes))):
            job, future = writes.popleft()
            self.write_tiles -= job.layout.count
            try:
                path = future.result()
            except StorageError as exc:
                self.storage_error = self.storage_error or exc
                continue
            except (VaetoolError, OSError) as exc:
                self._fail(job.task, exc)
                continue
            self.summary.done += 1
            self.callback("written", {"input": str(job.task.source.path), "output": str(path),
                                      "done": self._count(), "total": self.total})

    def _writes_full(self, in_flight: int) -> bool:
        return in_flight > self.min_images and self.write_tiles > self.max_tiles

    def _count(self) -> int:
        return self.summary.done + len(self.summary.failed)

    def _fail(self, task: Task, exc: BaseException) -> None:
        message = _message(task, exc)
        self.summary.failed.append((task.source.path, message))
        self.callback("failed", {"input": str(task.source.path), "message": message,
                                 "done": self._count(), "total": self.total})

    def _warn_once(self, job: _Job) -> None:
        """Say once (naming the first file) when an output cannot hold what the input had."""
        image, output = job.image, job.task.output
        fmt = images.format_for_path(output)
        has_alpha = image.alpha is not None and images.supports_alpha(fmt)
        if image.bit_depth == 16 and not images.can_write_16bit(fmt, image.pixels.shape[0], has_alpha=has_alpha):
            self._once("depth", f"{job.task.source.path} is 16-bit but {fmt} output stores 16 bits only for "
                                f"grayscale PNG or TIFF, so it and any like it are written at 8 bits "
                                f"(use --ext png to keep 16 bits)")
        if image.alpha is not None and not has_alpha:
            self._once("alpha", f"{job.task.source.path} has an alpha channel that {fmt} cannot store; it is "
                                f"dropped from it and any like it (use --ext png to keep it)")
        if job.layout.channels != job.layout.model_channels:
            how = ("replicated to RGB for this colour model and converted back to gray" if job.layout.channels == 1
                   else "denoised channel by channel with this grayscale model, so colour is kept")
            self._once(f"channels{job.layout.channels}", f"{job.layout.channels}-channel images such as "
                                                        f"{job.task.source.path} are {how}", event="note")

    def _once(self, key: str, message: str, *, event: str = "warning") -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.callback(event, {"message": message})


def _noop(event: str, data: dict[str, Any]) -> None:
    return None


def _prepare_model(checkpoint: str | os.PathLike | Checkpoint | VAEFamily, *, device: str,
                   precision: str) -> tuple[ModelRunner, tuple | None]:
    """The model on its device, and the corruptions it was trained with (None when unknown)."""
    dev = resolve_device(device)
    prepare(dev)
    if isinstance(checkpoint, VAEFamily):
        model, corruptions = checkpoint, None
    else:
        loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_model(checkpoint, device=dev)
        model = loaded.model
        corruptions = loaded.train_config.corruptions if loaded.train_config else ()
    model.to(dev, memory_format=torch.channels_last).eval()
    return ModelRunner(model, amp_dtype=resolve_precision(precision, dev)), corruptions


def denoise_files(checkpoint: str | os.PathLike | Checkpoint | VAEFamily, inputs: Sequence[str | os.PathLike],
                  out_dir: str | os.PathLike, *, tile: TileSpec = "auto", overlap: float = 0.25,
                  strength: float = 1.0, batch_size: int = 64, ext: str | None = None, suffix: str = "",
                  skip_existing: bool = False, force: bool = False, device: str = "auto", precision: str = "auto",
                  workers: int | None = None, stdin: TextIO | None = None,
                  callback: Callback | None = None) -> DenoiseSummary:
    """Denoise image files and folders into `out_dir`, mirroring the input tree; a bad file fails alone.

    `callback(event, data)` receives "start", "note", "warning", and one "written" or "failed" per
    file (with `done` and `total`), in input order. Raises VaetoolError only for problems with the
    run as a whole (checkpoint, options, output folder); per-file failures are in the summary.
    """
    callback = callback or _noop
    check_options(overlap=overlap, strength=strength, batch_size=batch_size)
    _check_ext(ext)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, inputs, force=force)
    found = images.find_images(inputs, stdin=stdin, on_warning=lambda m: callback("warning", {"message": m}))
    tasks, renamed = plan_outputs(found, out_dir, ext=ext, suffix=suffix)
    if renamed:
        callback("warning", {"message": f"{renamed} inputs would have the same output name with --ext {ext}; "
                                        f"their old extension is kept in the name (a_jpg.png)"})
    _check_no_input_overwritten(tasks)
    todo, skipped = _split_existing(tasks, skip_existing=skip_existing, force=force)
    check_writable_dirs(t.output for t in todo)  # a read-only or misplaced -o is one error, before any work
    run, corruptions = _prepare_model(checkpoint, device=device, precision=precision)
    tile_side = resolve_tile(tile, run.size)
    callback("start", {"images": len(tasks), "todo": len(todo), "skipped": skipped, "device": str(run.device),
                       "tile": tile_side, "model_size": run.size, "model_channels": run.channels,
                       "batch_size": batch_size, "corruptions": [str(c) for c in corruptions or ()]})
    if corruptions is not None and not corruptions:
        callback("note", {"message": "this checkpoint was trained without --corrupt, so the output is a plain VAE "
                                     "reconstruction (smoother, not a trained denoiser)"})
    summary = DenoiseSummary(total=len(tasks), done=0, skipped=skipped)
    started = time.monotonic()
    pipeline = _Pipeline(run, tile=tile_side, overlap=overlap, strength=strength, batch_size=batch_size,
                         force=force, workers=workers or images.default_workers(), callback=callback,
                         summary=summary, total=len(todo))
    try:
        pipeline.process(todo)
    finally:
        summary.seconds = time.monotonic() - started
    return summary


__all__ = ["DenoiseSummary", "Layout", "ModelRunner", "Task", "check_output_dir", "denoise_files", "denoise_image",
           "join_outputs", "mix", "output_path", "plan_outputs", "resolve_tile", "split_image"]
