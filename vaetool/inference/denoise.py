"""Denoising folders of images of any size: tiles from many images batched together, streamed decode and write.

Inputs and outputs go through the folder layer (`folder.py`: mirrored names, skip-existing, never
over an input, the background writer); one image's tiling and blending is `tiledenoise.py`.
"""

from __future__ import annotations

import functools
import math
import os
import time
import zlib
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ..config import TrainConfig
from ..errors import ConfigError, DataError, OutputError, VaetoolError
from ..events import Callback, Failed, Note, Started, Warning, ignore
from ..io.decode import DecodedImage, failure_reason, read_image
from ..io.find import FoundImage, find_images
from ..io.pool import default_workers
from ..io.write import can_write_16bit, format_for_path, supports_alpha
from ..models.base import VAEFamily
from ..runtime import resolve_precision
from .folder import Outcome, Task, Writer, check_not_inside, counting, plan_outputs, prepare_outputs
from .load import Source, load_for_inference, model_device
from .mmse import Draw, RowKey
from .tiledenoise import Layout, ModelRunner, TileSpec, check_options, join_outputs, mix
from .tiling import round_up
from .wiener import Probe, WienerStep, choose_wiener

# Posterior samples averaged for the MMSE estimate of a model trained as a denoiser (a noise model, or --corrupt
# at the full ELBO's beta 1), by default: where PSNR against K levels off (each doubling beyond adds under 0.03 dB
# for twice the time); there the estimate beats the posterior mean's decode by about 2 dB. A supervised denoiser
# trained with a smaller KL weight (its default, 0.01) has a narrow posterior: 16 samples gave the posterior
# mean's PSNR to 0.01 dB at 16 times the cost, so it gets the posterior mean (BENCHMARKS.md, "Denoising").
# With the Wiener step the posterior mean is the better pilot: the average of K samples is smoother, and the
# step keeps less of the detail it lacks (noisy-only faces at std 25: 29.24 dB at K = 0, 28.46 at K = 16).
DEFAULT_SAMPLES = 16
# Beyond these an output is not a denoised input: noise of std 50/255 removed changes an image by about
# 14 dB PSNR and its mean colour by under 2/255.
MISFIT_PSNR, MISFIT_SHIFT = 12.0, 8.0
WRITE_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP", "BMP", "PPM", "GIF")


def _check_ext(ext: str | None) -> None:
    if not ext:
        return
    try:
        fmt = format_for_path(Path("x." + ext.lstrip(".")))
    except OutputError:
        fmt = None
    if fmt not in WRITE_FORMATS:
        raise ConfigError(f"--ext {ext} is not an image format vaetool writes; use png, jpg, tif or webp")


@dataclass
class _Job:
    """An image on its way through the pipeline."""

    task: Task
    image: DecodedImage
    layout: Layout
    inputs: torch.Tensor | None  # (rows, Cm, S, S) model inputs, dropped once they have all run
    outputs: list[torch.Tensor] = field(default_factory=list)
    received: int = 0
    key: int = 0  # seeds the posterior samples of this image's inputs (mmse.py), from its relative path
    draw: Draw = None  # None: the clean estimate; d: the d-th plausible clean version
    probe: Probe | None = None  # with it, the inputs are the image's pieces and then its moved copy's

    @property
    def rows(self) -> int:
        return self.layout.count * (2 if self.probe is not None else 1)

    def keys(self, start: int, stop: int) -> list[RowKey]:
        # The moved copy's pieces draw the same posterior noise as the image's: the difference is the model's.
        return [(self.key, row % self.layout.count, self.draw) for row in range(start, stop)]


class _Batcher:
    """Packs model inputs from many images into batches and routes the outputs back.

    Inputs of one shape (tiles, or whole images of one size) share a batch of up to `rows(shape)`
    rows; a change of shape closes the batch, so a folder of same-sized images still runs in full batches.
    """

    def __init__(self, run: Callable[[torch.Tensor, list[RowKey]], torch.Tensor],
                 rows: Callable[[torch.Size], int]) -> None:
        self.run, self.rows = run, rows
        self.queue: deque[tuple[_Job, int]] = deque()  # (job, first row not yet queued into a batch)
        self.queued = 0  # rows queued, all of one shape

    def add(self, job: _Job) -> list[_Job]:
        """Queue a job's inputs; run every full batch; return the jobs now complete."""
        finished: list[_Job] = []
        if self.queue and job.inputs.shape[1:] != self.queue[0][0].inputs.shape[1:]:
            finished += self.flush()  # the head's shape can grow no more: run it, smaller batch or not
        self.queue.append((job, 0))
        self.queued += job.rows
        full = self.rows(job.inputs.shape)
        while self.queued >= full:
            finished += self._run_one()
        return finished

    def flush(self) -> list[_Job]:
        """Run what is left as a last, smaller batch."""
        finished: list[_Job] = []
        while self.queued:
            finished += self._run_one()
        return finished

    def _run_one(self) -> list[_Job]:
        pieces, need = [], self.rows(self.queue[0][0].inputs.shape)
        while need and self.queue:
            job, start = self.queue[0]
            stop = min(job.rows, start + need)
            pieces.append((job, start, stop))
            if stop == job.rows:
                self.queue.popleft()
            else:
                self.queue[0] = (job, stop)
            need -= stop - start
        batch = torch.cat([job.inputs[a:b] for job, a, b in pieces])  # (B, Cm, S, S)
        out = self.run(batch, [key for job, a, b in pieces for key in job.keys(a, b)])
        self.queued -= batch.shape[0]
        finished, offset = [], 0
        for job, a, b in pieces:
            job.outputs.append(out[offset: offset + b - a])
            offset += b - a
            job.received += b - a
            if job.received == job.rows:
                job.inputs = None  # free the inputs as soon as they have run
                finished.append(job)
        return finished


def _reason(exc: BaseException) -> str:
    """Why an input failed, in one line (the display names the file)."""
    if isinstance(exc, OSError) and not isinstance(exc, VaetoolError):
        return exc.strerror or str(exc)
    return failure_reason(exc) if isinstance(exc, DataError) else (str(exc) or type(exc).__name__)


class Pipeline:
    """Decode on threads -> batch tiles through the model on this thread -> blend and write on the writer's threads.

    Decodes run ahead and writes trail behind by about two batches of tiles (at least a few images),
    so the threads work while the model runs, and memory depends on the batch and the image sizes,
    never on how many files there are.
    """

    def __init__(self, run: ModelRunner, *, tile: int | None, overlap: float, strength: float, batch_size: int,
                 workers: int, callback: Callback, max_pixels: int | None = None,
                 keep: Callable[[Task, torch.Tensor, torch.Tensor], None] | None = None,
                 draws: dict[Path, int] | None = None, wiener: WienerStep | None = None) -> None:
        self.run, self.tile, self.overlap, self.strength, self.wiener = run, tile, overlap, strength, wiener
        self.draws = draws or {}  # output -> which plausible clean version it is (--diverse)
        self.max_pixels, self.keep = max_pixels, keep  # keep(task, input, output) sees each image on a writer thread
        self.batch_size, self.workers, self.callback = batch_size, workers, callback
        self.warned: set[str] = set()
        self.max_tiles = 2 * batch_size  # model inputs held ahead of the model, and again behind it
        self.min_images = 2 * workers + 2  # always enough images in flight to keep every thread busy
        self.tiles_seen, self.images_seen = 0, 0

    def process(self, tasks: Sequence[Task], *, force: bool) -> None:
        """Denoise every task, reporting each written or failed file; a full disk stops the batch."""
        batcher = _Batcher(self.run, functools.partial(self.run.rows_per_batch, self.batch_size))
        readers = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vaetool-read")
        writer = Writer(self.callback, force=force, workers=self.workers, chunk=1, max_weight=self.max_tiles,
                        min_jobs=self.min_images)
        try:
            with writer:
                for task, future in self._prefetch(tasks, readers):
                    job = self._take(task, future)
                    if job is not None:
                        self._write(writer, batcher.add(job))
                    writer.flush()  # reports the writes finished so far, waits when too many tiles wait
                    if writer.storage_error is not None:
                        break  # no new work; the writes already running still finish and are reported
                if writer.storage_error is None:
                    self._write(writer, batcher.flush())
        finally:
            # On Ctrl-C: decodes already started finish, queued ones are dropped.
            readers.shutdown(wait=True, cancel_futures=True)

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

    def _write(self, writer: Writer, jobs: list[_Job]) -> None:
        for job in jobs:
            writer.submit(job.task, functools.partial(self._finish, job), alpha=job.image.alpha,
                          bit_depth=job.image.bit_depth, weight=job.rows)

    def _load(self, task: Task) -> _Job:
        """On a worker thread: decode the file and cut it into model inputs."""
        format_for_path(task.output)  # an unwritable extension fails here, before any model time
        image = read_image(task.source.path)
        inputs, layout = self.run.split(image.pixels, tile=self.tile, max_pixels=self.max_pixels,
                                        overlap=self.overlap)
        key = zlib.crc32(task.source.relative.as_posix().encode()) if task.source is not None else 0
        draw = self.draws.get(task.output)
        probe = self.wiener.probe(image.pixels) if self.wiener is not None and draw is None else None
        if probe is not None:  # the moved copy goes through the model with the image, cut the same way
            moved, _ = self.run.split(probe.moved(image.pixels), tile=self.tile, max_pixels=self.max_pixels,
                                      overlap=self.overlap)
            inputs = torch.cat([inputs, moved])
        return _Job(task, image, layout, inputs, key=key, draw=draw, probe=probe)

    def _take(self, task: Task, future: Future) -> _Job | None:
        try:
            job = future.result()
        except (VaetoolError, OSError) as exc:
            self.callback(Failed(task.input, _reason(exc)))
            return None
        self.tiles_seen += job.rows
        self.images_seen += 1
        self._warn_once(job)
        return job

    def _finish(self, job: _Job) -> torch.Tensor:
        """On a writer thread: blend the tiles, take the Wiener step, and mix with the input by strength."""
        outputs, count = torch.cat(job.outputs), job.layout.count
        job.outputs = []
        denoised = join_outputs(outputs[:count], job.layout)  # (C, H, W)
        if self.wiener is not None and job.draw is None:  # a plausible clean version stays the model's own draw
            moved = join_outputs(outputs[count:], job.layout) if job.probe is not None else None
            denoised = self.wiener(job.image.pixels, denoised, job.probe, moved)
        result = mix(denoised, job.image.pixels, self.strength if job.draw is None else 1.0)
        if self.keep is not None:
            self.keep(job.task, job.image.pixels, result)
        return result

    def _warn_once(self, job: _Job) -> None:
        """Say once (naming the first file) when an output cannot hold what the input had."""
        image, output = job.image, job.task.output
        fmt = format_for_path(output)
        has_alpha = image.alpha is not None and supports_alpha(fmt)
        if image.bit_depth == 16 and not can_write_16bit(fmt, image.pixels.shape[0], has_alpha=has_alpha):
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
                                                        f"{job.task.source.path} are {how}", event=Note)

    def _once(self, key: str, message: str, *, event: type = Warning) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.callback(event(message))


def _prepare_model(checkpoint: Source, *, device: str, precision: str, samples: int | None, seed: int,
                   wiener: bool | None = None, sigma: float | None = None, block_matching: bool = True,
                   mirror: bool | None = None) -> tuple[ModelRunner, tuple | None, WienerStep | None]:
    """The model on its device, the corruptions it was trained with (None when unknown: a bare model), and
    the Wiener step (`choose_wiener`).

    `samples` None: the posterior-mean decode under the Wiener step; without it, the MMSE estimate over
    `DEFAULT_SAMPLES` for a model trained as a denoiser with a noise model, or with --corrupt at beta 1, else
    the posterior-mean decode.
    """
    loaded = load_for_inference(checkpoint, device=device)
    if isinstance(checkpoint, VAEFamily):
        corruptions = None
    else:
        corruptions = loaded.train_config.corruptions if loaded.train_config else ()
    if sigma is not None and not 0 < sigma < 1:
        raise ConfigError(f"--sigma must be above 0 and below 1 (0-1 scale) or 1-255 (0-255 scale), not {sigma}")
    step = choose_wiener(wiener, sigma, loaded.config, corruptions, matching=block_matching)
    if samples is None:
        full_elbo = loaded.train_config is not None and loaded.train_config.beta >= 1.0
        trained_to_denoise = loaded.config.noise_model != "none" or (corruptions and full_elbo)
        samples = DEFAULT_SAMPLES if trained_to_denoise and step is None else 0
    if samples < 0:
        raise ConfigError(f"--samples must be 0 (the posterior mean) or more, not {samples}")
    amp = resolve_precision(precision, model_device(loaded))
    if mirror is None:
        mirror = mirror_by_default(loaded.train_config)
    return ModelRunner(loaded.model, amp_dtype=amp, samples=samples, seed=seed, mirror=mirror), corruptions, step


def mirror_by_default(train_config: TrainConfig | None) -> bool:
    """Whether `denoise` averages each estimate with its mirror image's: for a model trained with mirrored
    images (`train --flip`, a denoiser's default), to which a mirror image is as much its data as the image.
    Supervised faces at std 15/25/50, 4 minutes of training: +0.18/+0.31/+0.36 dB; the detail-rich set and
    the photographs +0.00-0.04 (BENCHMARKS.md, "Mirror images")."""
    return bool(train_config and train_config.augment_flip)


def _diverse_tasks(found: Sequence[FoundImage], tasks: list[Task], *, count: int, folder: Path | None,
                   ext: str | None, suffix: str) -> tuple[list[Task], dict[Path, int]]:
    """Each input's task followed by its `count` plausible clean versions' (FOLDER/tree/stem_1.ext, ...),
    and which draw each of those is."""
    if count == 0:
        return tasks, {}
    if folder is None:
        raise ConfigError("--diverse N needs a folder for the versions: --diverse N DIR")
    width = len(str(count))
    extra = [plan_outputs(found, folder, ext=ext, suffix=f"{suffix}_{k + 1:0{width}d}")[0] for k in range(count)]
    draws = {task.output: k for k, planned in enumerate(extra) for task in planned}
    ordered = [task for i, main in enumerate(tasks) for task in [main, *(planned[i] for planned in extra)]]
    return ordered, draws


def _announce(callback: Callback, run: ModelRunner, count: int, corruptions: tuple | None, *, tile: int | None,
              max_pixels: int | None, batch_size: int, wiener: WienerStep | None) -> None:
    """`Started` with what the run does, and a `Note` when the model was never trained to denoise."""
    callback(Started("denoise", count, info={
        "device": str(run.device), "model": _describe(run), "tile": _describe_tiling(run, tile, max_pixels),
        "batch": batch_size, "estimate": _describe_estimate(run),
        "wiener": "off" if wiener is None else wiener.describe()}))
    if corruptions is not None and not corruptions and run.model.config.noise_model == "none":
        callback(Note("this checkpoint was trained without --corrupt, so the output is a plain VAE reconstruction "
                      "(smoother, not a trained denoiser)"))


def _describe(run: ModelRunner) -> str:
    if run.multiple is None:
        return f"{run.size} px x{run.channels}"
    return f"{run.model.kind}, any size (multiples of {run.multiple} px) x{run.channels}"


def _describe_estimate(run: ModelRunner) -> str:
    what = "posterior mean" if run.samples == 0 else f"MMSE over {run.samples} posterior samples (seed {run.seed})"
    return f"{what}, averaged with its mirror image's" if run.mirror else what


def _describe_tiling(run: ModelRunner, tile: int | None, max_pixels: int | None) -> str:
    if run.multiple is None:
        return "off (whole image resized)" if tile is None else f"{tile} px"
    if tile is not None:
        return f"{round_up(tile, run.multiple)} px"
    if max_pixels is None:
        return "off (each image whole, at its own size)"
    side = math.isqrt(max_pixels)
    return f"off (each image whole, at its own size; tiles above {side}x{side} px)"


class ChangeMeter:
    """How far the outputs moved from their inputs, for the warning that the model does not fit the images.

    Denoising removes zero-mean noise, so it leaves each image's mean colour where it was; a model that
    does not fit the images (trained on other content) shifts colours and changes far more than noise.
    Called on writer threads, hence the lock.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.squared = self.shift = 0.0
        self.images = 0

    def __call__(self, task: Task, source: torch.Tensor, output: torch.Tensor) -> None:
        change = (output.float() - source.float()).flatten(1)  # (C, H W)
        with self.lock:
            self.squared += float(change.pow(2).mean())
            self.shift += float(change.mean(1).abs().max())
            self.images += 1

    def warning(self) -> str | None:
        if not self.images:
            return None
        psnr = 10 * math.log10(1.0 / max(self.squared / self.images, 1e-12))
        shift = 255 * self.shift / self.images
        if shift <= MISFIT_SHIFT and psnr >= MISFIT_PSNR:
            return None
        return (f"the outputs moved far from their inputs ({psnr:.1f} dB PSNR between them, mean colour shifted by "
                f"{shift:.0f}/255 on average): removing noise changes neither so much; the model may not fit these "
                f"images (check with `vaetool eval`, or train on images like them)")


def denoise_files(checkpoint: Source, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                  tile: TileSpec = "auto", overlap: float = 0.25, strength: float = 1.0, batch_size: int = 64,
                  ext: str | None = None, suffix: str = "", skip_existing: bool = False, force: bool = False,
                  device: str = "auto", precision: str = "auto", workers: int | None = None,
                  samples: int | None = None, seed: int = 0, diverse: int = 0,
                  diverse_dir: str | os.PathLike | None = None, wiener: bool | None = None,
                  sigma: float | None = None, block_matching: bool = True, mirror: bool | None = None,
                  stdin: TextIO | None = None, callback: Callback = ignore) -> Outcome:
    """Denoise image files and folders into `out_dir`, mirroring the input tree; a bad file fails alone.

    `samples` K > 0 writes the MMSE estimate, the mean of K posterior samples' decodes; 0 the decode
    of the posterior mean; None chooses (0 under the Wiener step; without it K = `DEFAULT_SAMPLES` for a
    model trained as a denoiser, else 0).
    `diverse` N also writes N plausible clean versions of each image (single posterior samples) under
    `diverse_dir`, mirroring the tree as `stem_1.png`...; `seed` fixes every sample. `wiener` True takes the
    Wiener step on each estimate (`wiener.py`), False never, None for a Gaussian denoiser; `sigma` is the
    noise std it assumes (0-1 scale; None: the model's noise model, else estimated from each image);
    `block_matching` False leaves out its collaborative pass (the step 10 times faster, 0.0-1.6 dB less).
    `mirror` averages the model's estimates of each image and its mirror image (None: for a model trained
    with --flip, `mirror_by_default`).

    Reports `Started`, `Note`, `Warning`, and one `Skipped`, `Written` or `Failed` per file (each
    followed by `Progress`). Raises VaetoolError only for problems with the run as a whole
    (checkpoint, options, output folder, existing outputs without --skip-existing or --force);
    per-file failures are in the returned outcome.
    """
    started, outcome = time.monotonic(), Outcome()
    callback = outcome.recorder(callback)
    check_options(overlap=overlap, strength=strength, batch_size=batch_size)
    _check_ext(ext)
    out_dir = Path(out_dir)
    for folder in (out_dir, *([Path(diverse_dir)] if diverse else [])):
        check_not_inside(folder, inputs, force=force)
    found = find_images(inputs, stdin=stdin, callback=callback)
    tasks, renamed = plan_outputs(found, out_dir, ext=ext, suffix=suffix)
    if renamed:
        callback(Warning(f"{renamed} inputs would have the same output name with --ext {ext}; "
                         f"their old extension is kept in the name (a_jpg.png)"))
    tasks, draws = _diverse_tasks(found, tasks, count=diverse, folder=Path(diverse_dir) if diverse_dir else None,
                                  ext=ext, suffix=suffix)
    counted = counting(callback, total=len(tasks))
    todo = prepare_outputs(tasks, skip_existing=skip_existing, force=force, callback=counted)
    run, corruptions, step = _prepare_model(checkpoint, device=device, precision=precision, samples=samples,
                                            seed=seed, wiener=wiener, sigma=sigma, block_matching=block_matching,
                                            mirror=mirror)
    tile_side, max_pixels = run.tiling(tile)
    _announce(callback, run, len(tasks), corruptions, tile=tile_side, max_pixels=max_pixels, batch_size=batch_size,
              wiener=step)
    meter = ChangeMeter()
    pipeline = Pipeline(run, tile=tile_side, overlap=overlap, strength=strength, batch_size=batch_size,
                         workers=workers or default_workers(), callback=counted, max_pixels=max_pixels, draws=draws,
                         keep=meter, wiener=step)
    try:
        pipeline.process(todo, force=force)
    finally:
        outcome.seconds = time.monotonic() - started
    misfit = meter.warning()
    if misfit:
        callback(Warning(misfit))
    return outcome
