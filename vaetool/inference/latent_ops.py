"""Folder-level latent operations: encode, decode, sample, interpolate, reconstruct, traverse.

Inputs stream through `images.iter_batches` (decoded on worker threads), the model runs in batches
under inference mode, and outputs are written on background threads while the next batch runs,
so memory stays bounded for any folder size. Progress and per-file outcomes go to a callback.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import contextlib
import functools
import io
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..io import images
from ..checkpoint import Checkpoint
from ..io.atomic import check_writable_dirs, output_error, remove_quietly, write_file
from ..errors import DataError, OutputError, StorageError, VaetoolError
from ..io.write import quantize
from ..io.latents import lerp, slerp
from ..io.png import encode_png

Callback = Callable[[str, dict[str, Any]], None]


def _noop(event: str, data: dict[str, Any]) -> None:
    return None


@dataclass
class Outcome:
    """What a batch command did: files written, skipped (already there) and failed (with reasons)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


@functools.lru_cache(maxsize=32)
def _format(suffix: str) -> str:
    return images.format_for_path(Path("image" + suffix))


def write_output(path: Path, pixels: torch.Tensor, *, force: bool = False) -> Path:
    """Write (C, H, W) pixels (float in [0, 1], or uint8 from `quantize`) as an 8-bit image, format from the
    extension, renamed into place.

    Atomic like `images.write_image` (a crash never leaves a partial file under the final name) but not
    fsynced per file: for thousands of small images the fsync costs more CPU than the model itself. A
    power cut can leave empty files, which `--skip-existing` writes again.
    """
    if not force and os.path.lexists(path):
        raise OutputError(f"{path} already exists; pass --force to overwrite it (or --skip-existing to resume)")
    try:
        fmt = _format(path.suffix.lower())
    except OutputError:
        raise OutputError(f"{path}: cannot tell an image format from the extension; use .png, .jpg, .tif or .webp") \
            from None
    u8 = pixels if pixels.dtype == torch.uint8 else quantize(pixels)  # (C, H, W)
    data = _encode(path, u8, fmt)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        try:
            write_file(tmp, data)
        except FileNotFoundError:  # the first file of a new subfolder
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)  # may fail too (no folder to hold it); the write's error is the one to tell
        raise output_error(path, exc) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def _encode(path: Path, u8: torch.Tensor, fmt: str) -> bytes | memoryview:
    """The file's bytes: PNG through the fast encoder, other formats through PIL."""
    if fmt == "PNG":
        return encode_png(u8)
    image = Image.fromarray(u8[0].numpy() if u8.shape[0] == 1 else u8.permute(1, 2, 0).contiguous().numpy())
    encoded = io.BytesIO()
    try:
        image.save(encoded, format=fmt, **images.save_options(fmt))
    except (ValueError, KeyError, OSError) as exc:
        raise OutputError(f"{path}: cannot write a {image.mode} image as {fmt} ({exc}); use a .png output") from None
    return encoded.getbuffer()


class OutputWriter:
    """Writes images on background threads, reporting each in submission order as it completes.

    Images go to the threads in runs of `chunk`: one task per image cost more in thread hand-offs
    than encoding a small PNG does.
    """

    def __init__(self, callback: Callback, outcome: Outcome, *, force: bool = False, workers: int = 2,
                 max_pending: int = 256, chunk: int = 16, write: Callable[..., Path] = write_output) -> None:
        self.callback, self.outcome, self.force, self.write = callback, outcome, force, write
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vaetool-write")
        self.pending: collections.deque = collections.deque()  # (jobs, future of their errors)
        self.queued: list[tuple[Path, torch.Tensor, bool]] = []  # the run being filled
        self.chunk = max(1, chunk)
        self.max_pending = max_pending  # bounds the decoded images held while the disk catches up
        self.storage_error: StorageError | None = None  # a full or read-only disk stops the whole batch

    def submit(self, path: Path, pixels: torch.Tensor, *, redo: bool = False) -> None:
        """Queue one image; `redo` replaces an empty leftover that --skip-existing chose to write again."""
        if self.storage_error is not None:
            raise self.storage_error
        self.queued.append((path, pixels, self.force or redo))
        if len(self.queued) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Hand the images queued so far to the threads."""
        if self.queued:
            jobs, self.queued = self.queued, []
            self.pending.append((jobs, self.pool.submit(self._write_all, jobs)))
        self._collect(block=len(self.pending) * self.chunk > self.max_pending)

    def _write_all(self, jobs: list[tuple[Path, torch.Tensor, bool]]) -> list[VaetoolError | None]:
        errors: list[VaetoolError | None] = []
        for path, pixels, force in jobs:
            try:
                self.write(path, pixels, force=force)
                errors.append(None)
            except VaetoolError as exc:
                errors.append(exc)
        return errors

    def _collect(self, *, block: bool = False) -> None:
        while self.pending and (block or self.pending[0][1].done()):
            jobs, future = self.pending.popleft()
            block = False
            for (path, _, _), error in zip(jobs, future.result()):
                if isinstance(error, StorageError):
                    self.storage_error = self.storage_error or error
                elif error is not None:
                    self.outcome.failed.append((str(path), str(error)))
                    self.callback("failed", {"path": str(path), "reason": str(error)})
                else:
                    self.outcome.written.append(path)
                    self.callback("written", {"path": str(path)})

    def close(self) -> None:
        """Wait for every queued write (reporting each); then raise a storage error if one stopped the batch."""
        try:
            self.flush()
            while self.pending:
                self._collect(block=True)
        finally:
            self.pool.shutdown()
        if self.storage_error is not None:
            raise self.storage_error

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(VaetoolError):  # the exception already on its way is the one to report
            self.close()


def _model_input(checkpoint: Checkpoint, batch: torch.Tensor) -> torch.Tensor:
    device = next(checkpoint.model.parameters()).device
    return images.to_float(batch, device).contiguous(memory_format=torch.channels_last)


def prepare(checkpoint: Checkpoint) -> Checkpoint:
    """Eval mode, channels_last: the layout the convolutions run fastest in."""
    checkpoint.model.eval().to(memory_format=torch.channels_last)
    return checkpoint


def stream_posteriors(checkpoint: Checkpoint, found: Sequence[images.FoundImage], *, batch_size: int,
                      callback: Callback = _noop, workers: int | None = None,
                      ) -> Iterator[tuple[list[images.FoundImage], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (items, uint8 images, mu, logvar) per batch; unreadable files go to the callback as "failed"."""
    cfg = checkpoint.config
    done = 0
    batches = images.iter_batches(found, image_size=cfg.image_size, channels=cfg.channels, batch_size=batch_size,
                                  workers=workers)
    for items, batch, failures in batches:
        for item, reason in failures:
            callback("failed", {"path": str(item.path), "reason": reason})
        done += len(items) + len(failures)
        if items:
            with torch.inference_mode():
                posterior = checkpoint.model.encode(_model_input(checkpoint, batch))
            yield items, batch, posterior.mu.float().cpu(), posterior.logvar.float().cpu()
        callback("progress", {"done": done, "total": len(found)})


def encode_rows(checkpoint: Checkpoint, found: Sequence[images.FoundImage], *, batch_size: int,
                sample: bool = False, seed: int = 0, callback: Callback = _noop,
                ) -> Iterator[tuple[list[images.FoundImage], dict[str, torch.Tensor]]]:
    """Yield (items, {"mu", "logvar"[, "z"]}) per batch, each (B, D); z ~ q(z|x) from a CPU generator."""
    generator = torch.Generator().manual_seed(seed)
    for items, _, mu, logvar in stream_posteriors(checkpoint, found, batch_size=batch_size, callback=callback):
        rows = {"mu": mu, "logvar": logvar}
        if sample:  # reparameterization: mu + sigma * eps, eps drawn in input order so the seed fixes z
            rows["z"] = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator)
        yield items, rows


def encode_to_file(checkpoint: Checkpoint, found: Sequence[images.FoundImage], output: Path, *, batch_size: int,
                   sample: bool = False, seed: int = 0, force: bool = False,
                   callback: Callback = _noop) -> tuple[Path | None, int]:
    """Encode images into one latents file written once at the end; (path or None if nothing was read, rows)."""
    from ..io.latents import save_latents

    if output.exists() and not force:  # fail before the work, not after it
        raise OutputError(f"{output} already exists; pass --force to overwrite it")
    check_writable_dirs([output])
    # One (N, D) table per key, allocated before the first batch: many small tensors kept while large
    # activations come and go would fragment the heap, and RSS would grow with the folder.
    keys = ("mu", "logvar", "z") if sample else ("mu", "logvar")
    table = {key: torch.empty(len(found), checkpoint.config.latent_dim) for key in keys}
    done: list[images.FoundImage] = []
    for items, rows in encode_rows(checkpoint, found, batch_size=batch_size, sample=sample, seed=seed,
                                   callback=callback):
        for key, value in rows.items():
            table[key][len(done):len(done) + len(items)] = value
        done += items
    if not done:
        return None, 0
    path = save_latents(output, {k: v[:len(done)] for k, v in table.items()}, paths=[str(i.path) for i in done],
                        relative=[str(i.relative) for i in done], identity=checkpoint.identity,
                        config=checkpoint.config.to_dict(), force=force)
    return path, len(done)


def decode_images(checkpoint: Checkpoint, z: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Mean images (B, C, H, W) in [0, 1] on the CPU for latents z (B, D), `batch_size` rows per forward pass."""
    model = checkpoint.model
    device = next(model.parameters()).device
    step = batch_size or max(1, len(z))
    with torch.inference_mode():
        parts = [model.mean_image(model.decode(z[i:i + step].to(device))).float().cpu()
                 for i in range(0, len(z), step)]
    return torch.cat(parts) if parts else torch.empty(0)


def decoded_paths(out_dir: Path, names: Sequence[str] | None, count: int, *, ext: str) -> list[Path]:
    """Output files for decoded rows: the encoded images' relative paths when every one is safe and
    unique, else `000000.png`... A latents file is user data: a name must not lead outside OUT_DIR."""
    suffix = "." + ext.lstrip(".")
    if names is not None and len(names) == count:
        relative = [Path(name).with_suffix(suffix) for name in names if _is_safe_relative(name)]
        if len(relative) == count and len(set(relative)) == count:
            return [out_dir / r for r in relative]
    return [out_dir / f"{i:06d}{suffix}" for i in range(count)]


def _is_safe_relative(name: str) -> bool:
    path = Path(name)
    return bool(name) and path.name not in ("", ".", "..") and not path.is_absolute() and not path.drive \
        and ".." not in path.parts and "\\" not in name


def _check_width(checkpoint: Checkpoint, z: torch.Tensor, source: str) -> None:
    if z.ndim != 2 or z.shape[1] != checkpoint.config.latent_dim:
        raise DataError(f"{source}: latents are {z.shape[-1]}-dimensional but the checkpoint's latent_dim is "
                        f"{checkpoint.config.latent_dim}; use latents encoded with the same checkpoint")


def _target(path: Path, *, skip_existing: bool, outcome: Outcome, callback: Callback) -> bool:
    """Whether to write `path`: False (and noted) when it exists and --skip-existing resumes."""
    if skip_existing and path.exists() and path.stat().st_size > 0:  # empty: cut off by a crash, redo it
        outcome.skipped.append(path)
        callback("skipped", {"path": str(path)})
        return False
    return True


def write_decoded(checkpoint: Checkpoint, z: torch.Tensor, paths: Sequence[Path], *, batch_size: int,
                  force: bool = False, skip_existing: bool = False, callback: Callback = _noop,
                  source: str = "latents") -> Outcome:
    """Decode each row of z to the matching path (written on background threads)."""
    _check_width(checkpoint, z, source)
    check_writable_dirs(paths)  # a read-only or misplaced output folder is one error, before any work
    outcome = Outcome()
    with OutputWriter(callback, outcome, force=force) as writer:
        for start in range(0, len(z), batch_size):
            rows = [i for i in range(start, min(start + batch_size, len(z)))
                    if _target(paths[i], skip_existing=skip_existing, outcome=outcome, callback=callback)]
            if rows:
                for i, pixels in zip(rows, quantize(decode_images(checkpoint, z[rows]))):  # one op per batch
                    writer.submit(paths[i], pixels, redo=skip_existing)
            callback("progress", {"done": min(start + batch_size, len(z)), "total": len(z)})
    return outcome


def prior_latents(checkpoint: Checkpoint, count: int, *, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """z ~ N(0, T^2 I), drawn on the CPU from the seed: the same seed gives the same z on any device."""
    generator = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(count, checkpoint.config.latent_dim, generator=generator)


def path_segments(anchors: torch.Tensor, *, steps: int, method: str) -> torch.Tensor:
    """Frames through consecutive anchors (K, D): `steps` per segment, shared endpoints once -> (F, D)."""
    if method not in ("slerp", "lerp"):
        raise DataError(f"unknown interpolation method {method!r}; use slerp or lerp")
    step = slerp if method == "slerp" else lerp
    t = torch.linspace(0.0, 1.0, steps)
    frames = [step(anchors[i], anchors[i + 1], t if i == 0 else t[1:]) for i in range(len(anchors) - 1)]
    return torch.cat(frames)


def reconstruct_folder(checkpoint: Checkpoint, found: Sequence[images.FoundImage], out_dir: Path, *,
                       batch_size: int, ext: str | None = None, force: bool = False, skip_existing: bool = False,
                       grid: Path | None = None, grid_count: int = 16, callback: Callback = _noop) -> Outcome:
    """Reconstruct every image from its posterior mean into OUT_DIR, mirroring the input tree."""
    outcome = Outcome()
    originals: list[torch.Tensor] = []
    recons: list[torch.Tensor] = []
    targets = {item.path: output_path(out_dir, item, ext) for item in found}
    check_writable_dirs(targets.values())  # a read-only or misplaced output folder is one error, before any work
    todo = [item for item in found if _target(targets[item.path], skip_existing=skip_existing, outcome=outcome,
                                              callback=callback)]
    sink = _counting(callback, outcome)
    with OutputWriter(callback, outcome, force=force) as writer:
        for items, batch, mu, _ in stream_posteriors(checkpoint, todo, batch_size=batch_size, callback=sink):
            pixels = decode_images(checkpoint, mu)
            for item, image in zip(items, quantize(pixels)):
                writer.submit(targets[item.path], image, redo=skip_existing)
            if grid is not None and sum(len(o) for o in originals) < grid_count:
                originals.append(batch.float() / 255.0)
                recons.append(pixels)
    if grid is not None and originals:
        top = torch.cat(originals)[:grid_count]
        images.save_grid(grid, torch.cat([top, torch.cat(recons)[: len(top)]]), nrow=len(top), force=force)
    return outcome


def _counting(callback: Callback, outcome: Outcome) -> Callback:
    """Pass events on, recording unreadable inputs as failures."""
    def sink(event: str, data: dict[str, Any]) -> None:
        if event == "failed":
            outcome.failed.append((data["path"], data["reason"]))
        callback(event, data)
    return sink


def output_path(out_dir: Path, item: images.FoundImage, ext: str | None) -> Path:
    """OUT_DIR / the input's path relative to its input folder; the extension kept unless `ext` is given."""
    relative = item.relative
    if ext:
        relative = relative.with_suffix("." + ext.lstrip("."))
    return out_dir / relative


def check_outputs_apart(out_dir: Path, found: Sequence[images.FoundImage], *, ext: str | None) -> None:
    """Refuse a plan that would write over any input file."""
    inputs = {item.path.resolve() for item in found}
    for item in found:
        target = output_path(out_dir, item, ext).resolve()
        if target in inputs:
            raise OutputError(f"writing {target} would overwrite an input; choose another output folder")


def average_kl_per_dim(checkpoint: Checkpoint, found: Sequence[images.FoundImage], *, batch_size: int,
                       callback: Callback = _noop) -> torch.Tensor:
    """Mean KL(q(z_d|x) || N(0, 1)) over a folder, per latent dimension (D,): how much each dimension is used."""
    total = torch.zeros(checkpoint.config.latent_dim, dtype=torch.float64)
    count = 0
    for items, _, mu, logvar in stream_posteriors(checkpoint, found, batch_size=batch_size, callback=callback):
        total += (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).double().sum(0)
        count += len(items)
    if count == 0:
        raise DataError("no readable image to rank the latent dimensions with; check --data")
    return total / count


def traverse_grid(checkpoint: Checkpoint, base: torch.Tensor, dims: Sequence[int], *, steps: int,
                  span: float) -> torch.Tensor:
    """Images (len(dims) * steps, C, H, W): row r sweeps dimension dims[r] over base +- span (prior sigmas)."""
    offsets = torch.linspace(-span, span, steps)
    rows = []
    for dim in dims:
        z = base.repeat(steps, 1)  # (steps, D)
        z[:, dim] = base[dim] + offsets
        rows.append(z)
    return decode_images(checkpoint, torch.cat(rows))
