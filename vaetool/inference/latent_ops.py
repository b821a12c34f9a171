"""Latent operations on folders and tensors, for every model family: encode rows, decode, prior latents, traverse.

Inputs stream through `io.batches.iter_batches` (decoded on worker threads), the model runs in
batches under inference mode, and outputs go through the folder layer's background `Writer` while
the next batch runs, so memory stays bounded for any folder size. Progress and per-file outcomes
are events (`vaetool.events`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import torch

from ..checkpoint import Checkpoint
from ..errors import DataError, OutputError
from ..events import Callback, Progress, Started, ignore
from ..io.atomic import check_writable_dirs
from ..io.batches import iter_batches
from ..io.decode import to_float
from ..io.find import FoundImage, find_images
from ..io.latents import lerp, save_latents, slerp, tensor_key
from ..io.write import quantize, save_grid
from ..models.base import DiagonalGaussian, FactorizedPosterior, Latents, Posterior
from ..runtime import autocast, resolve_precision
from .folder import Outcome, Writer, check_not_inside, plan_outputs, prepare_outputs, tasks_for
from .latent_space import count_of, fit_levels, level_names, posterior_levels, rows_of, traverse_latents
from .load import model_device

Inputs = Sequence[str | os.PathLike]


def _stream(checkpoint: Checkpoint, found: Sequence[FoundImage], *, batch_size: int, callback: Callback,
            workers: int | None = None, done: int = 0, total: int | None = None, amp: torch.dtype | None = None,
            ) -> Iterator[tuple[list[FoundImage], torch.Tensor, Posterior, dict[str, DiagonalGaussian]]]:
    """Yield (items, uint8 images, q(z|x) on the device, each level's Gaussian on the CPU in float32); the
    encoder runs under `amp`'s autocast (None: float32)."""
    cfg = checkpoint.config
    total = len(found) + done if total is None else total
    device = model_device(checkpoint)
    for items, batch, failures in iter_batches(found, image_size=cfg.image_size, channels=cfg.channels,
                                               batch_size=batch_size, workers=workers, callback=callback):
        done += len(items) + len(failures)
        if items:
            with torch.inference_mode(), autocast(device, amp):
                x = to_float(batch, device).contiguous(memory_format=torch.channels_last)  # (B, C, S, S)
                posterior = checkpoint.model.encode(x)
                levels = {name: DiagonalGaussian(q.mu.float().cpu(), q.logvar.float().cpu())
                          for name, q in posterior_levels(posterior).levels.items()}
            yield items, batch, posterior, levels
        callback(Progress(done, total))


def stream_posteriors(checkpoint: Checkpoint, found: Sequence[FoundImage], *, batch_size: int,
                      callback: Callback = ignore, workers: int | None = None, done: int = 0,
                      total: int | None = None) -> Iterator[tuple[list[FoundImage], torch.Tensor, FactorizedPosterior]]:
    """Yield (items, uint8 images, each level's q on the CPU in float32) per batch; unreadable files are `Failed`.

    In a hierarchy a level's Gaussian is q(z_l | x, z_<l) with the levels above at their means, so
    `.mode()` decodes to the reconstruction (its `kl_terms` are to N(0, I), right for the top only).
    `Progress` counts from `done` up to `total` (default: the files given).
    """
    for items, batch, _, levels in _stream(checkpoint, found, batch_size=batch_size, callback=callback,
                                           workers=workers, done=done, total=total):
        yield items, batch, FactorizedPosterior(levels)


def encode_rows(checkpoint: Checkpoint, inputs: Inputs, *, batch_size: int, sample: bool = False, seed: int = 0,
                stdin: TextIO | None = None, callback: Callback = ignore, precision: str = "auto",
                ) -> Iterator[tuple[list[FoundImage], dict[str, torch.Tensor]]]:
    """Yield (items, tensors) per batch, keyed as the latents file stores them (`tensor_key`: "mu", "logvar"
    [, "z"] for the vector family, "level.mu"... for the others), each (B, ...); z ~ q(z|x) from a CPU generator.
    `precision` is the encoder's autocast (`auto`: float32 on CPUs, so latents match across machines)."""
    amp = resolve_precision(precision, model_device(checkpoint))  # a bad precision stops here, before any work
    found = find_images(inputs, stdin=stdin, callback=callback)
    return _encode_found(checkpoint, found, batch_size=batch_size, sample=sample, seed=seed, callback=callback,
                         amp=amp)


def _encode_found(checkpoint: Checkpoint, found: Sequence[FoundImage], *, batch_size: int, sample: bool, seed: int,
                  callback: Callback, amp: torch.dtype | None = None,
                  ) -> Iterator[tuple[list[FoundImage], dict[str, torch.Tensor]]]:
    callback(Started("encode", len(found)))
    generator = torch.Generator().manual_seed(seed)
    size = checkpoint.config.image_size
    names = checkpoint.model.latent_shapes(size, size)
    for items, _, posterior, levels in _stream(checkpoint, found, batch_size=batch_size, callback=callback, amp=amp):
        rows = {}
        for name, q in levels.items():
            rows[tensor_key(name, "mu", names)], rows[tensor_key(name, "logvar", names)] = q.mu, q.logvar
        if sample:
            for name, z in _posterior_sample(checkpoint, posterior, levels, generator).items():
                rows[tensor_key(name, "z", names)] = z
        yield items, rows


def _posterior_sample(checkpoint: Checkpoint, posterior: Posterior, levels: dict[str, DiagonalGaussian],
                      generator: torch.Generator) -> Latents:
    """z ~ q(z|x) (ancestral in a hierarchy) with eps drawn on the CPU image by image, level by level,
    so the seed fixes every image's z whatever the batch size and device."""
    count = len(next(iter(levels.values())).mu)
    per_image = [{name: torch.randn(1, *q.mu.shape[1:], generator=generator) for name, q in levels.items()}
                 for _ in range(count)]
    device = model_device(checkpoint)
    noise = {name: torch.cat([eps[name] for eps in per_image]).to(device) for name in levels}
    with torch.inference_mode():
        return {name: z.float().cpu() for name, z in posterior.sample(noise=noise).items()}


def encode_to_file(checkpoint: Checkpoint, inputs: Inputs, output: Path, *, batch_size: int, sample: bool = False,
                   seed: int = 0, force: bool = False, stdin: TextIO | None = None,
                   callback: Callback = ignore, precision: str = "auto") -> tuple[Path | None, int]:
    """Encode images into one latents file written once at the end; (path or None if nothing was read, rows)."""
    amp = resolve_precision(precision, model_device(checkpoint))
    if output.exists() and not force:  # fail before the work, not after it
        raise OutputError(f"{output} already exists; pass --force to overwrite it")
    check_writable_dirs([output])
    found = find_images(inputs, stdin=stdin, callback=callback)
    table: dict[str, torch.Tensor] = {}
    done: list[FoundImage] = []
    for items, rows in _encode_found(checkpoint, found, batch_size=batch_size, sample=sample, seed=seed,
                                     callback=callback, amp=amp):
        if not table:
            # One (N, ...) table per key, allocated when the first batch arrives: many small tensors kept while
            # large activations come and go would fragment the heap, and RSS would grow with the folder.
            table = {key: torch.empty(len(found), *value.shape[1:]) for key, value in rows.items()}
        for key, value in rows.items():
            table[key][len(done):len(done) + len(items)] = value
        done += items
    if not done:
        return None, 0
    size = checkpoint.config.image_size
    path = save_latents(output, {k: v[:len(done)] for k, v in table.items()}, paths=[str(i.path) for i in done],
                        relative=[str(i.relative) for i in done], identity=checkpoint.identity,
                        config=checkpoint.config.to_dict(), force=force,
                        levels=checkpoint.model.latent_shapes(size, size), family=checkpoint.config.kind,
                        image_size=(size, size))
    return path, len(done)


def check_precision(checkpoint: Checkpoint, precision: str) -> None:
    """Refuse a precision the checkpoint's device cannot run (fp16 on a CPU) before any work or output."""
    resolve_precision(precision, model_device(checkpoint))


def decode_images(checkpoint: Checkpoint, z: torch.Tensor | Latents, *, batch_size: int | None = None,
                  precision: str = "auto") -> torch.Tensor:
    """Mean images (B, C, H, W) in [0, 1] on the CPU for latents z ((B, D), or the family's levels),
    `batch_size` rows per forward pass, under `precision`'s autocast (`auto`: float32 on CPUs)."""
    model = checkpoint.model
    device = model_device(checkpoint)
    amp = resolve_precision(precision, device)
    count = len(next(iter(z.values()))) if isinstance(z, dict) else len(z)
    step = batch_size or max(1, count)
    parts = []
    with torch.inference_mode(), autocast(device, amp):
        for i in range(0, count, step):
            part = ({k: v[i:i + step].to(device) for k, v in z.items()} if isinstance(z, dict)
                    else z[i:i + step].to(device))
            parts.append(model.mean_image(model.decode(part)).float().cpu())
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


def as_level_dict(checkpoint: Checkpoint, z: torch.Tensor | Latents) -> Latents:
    """Latents as levels: a bare tensor is a one-level family's only level."""
    if isinstance(z, dict):
        return z
    names = level_names(checkpoint.model)
    if len(names) != 1:
        raise DataError(f"a {checkpoint.config.kind} model's latents have the levels {', '.join(names)}, not one "
                        f"tensor")
    return {names[0]: z}


def write_decoded(checkpoint: Checkpoint, z: torch.Tensor | Latents, paths: Sequence[Path], *, batch_size: int,
                  force: bool = False, skip_existing: bool = False, callback: Callback = ignore,
                  source: str = "latents", command: str = "decode", precision: str = "auto") -> Outcome:
    """Decode each row of the latents (every level checked against the model) to the matching path, written
    on background threads; `command` names the work, `precision` the decoder's autocast."""
    check_precision(checkpoint, precision)
    latents = as_level_dict(checkpoint, z)
    fit_levels(checkpoint.model, latents, source)
    count = count_of(latents)
    started, outcome = time.monotonic(), Outcome()
    callback = outcome.recorder(callback)
    callback(Started(command, count))
    tasks = tasks_for(paths)
    todo = {t.output: t for t in prepare_outputs(tasks, skip_existing=skip_existing, force=force, callback=callback)}
    with Writer(callback, force=force) as writer:
        for start in range(0, count, batch_size):
            rows = [i for i in range(start, min(start + batch_size, count)) if tasks[i].output in todo]
            if rows:
                # one decode and one quantize per batch
                pixels = quantize(decode_images(checkpoint, rows_of(latents, rows), precision=precision))
                for i, image in zip(rows, pixels):
                    writer.submit(todo[tasks[i].output], image)
            callback(Progress(min(start + batch_size, count), count))
    outcome.seconds = time.monotonic() - started
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


def average_kl_per_dim(checkpoint: Checkpoint, inputs: Inputs, *, batch_size: int, stdin: TextIO | None = None,
                       callback: Callback = ignore) -> torch.Tensor:
    """Mean KL(q(z_d|x) || N(0, 1)) over a folder per element of the vector level (a hierarchy's top), or of
    every level flattened and joined for a family without one: how much each dimension is used."""
    found = find_images(inputs, stdin=stdin, callback=callback)
    callback(Started("rank", len(found)))
    total: torch.Tensor | None = None
    count = 0
    keep = checkpoint.model.vector_level
    for items, _, posterior in stream_posteriors(checkpoint, found, batch_size=batch_size, callback=callback):
        terms = posterior.kl_terms()
        terms = {keep: terms[keep]} if keep is not None else terms
        kl = torch.cat([t.flatten(1) for t in terms.values()], dim=1).double().sum(0)  # (D,)
        total = kl if total is None else total + kl
        count += len(items)
    if total is None or count == 0:
        raise DataError("no readable image to rank the latent dimensions with; check --data")
    return total / count


def traverse_grid(checkpoint: Checkpoint, base: torch.Tensor, dims: Sequence[int], *, steps: int,
                  span: float, precision: str = "auto") -> torch.Tensor:
    """Images (len(dims) * steps, C, H, W): row r sweeps dimension dims[r] of the vector level (a hierarchy's
    top) over base +- span (prior sigmas); the levels below at their conditional prior means."""
    return decode_images(checkpoint, traverse_latents(checkpoint, base, list(dims), steps=steps, span=span),
                         precision=precision)
