"""`vaetool encode`, `decode`, `sample`, `interpolate`, `reconstruct` and `traverse`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import (EXIT_PARTIAL, BatchSize, Checkpoint, Device, Force, Json, Quiet, Seed, check_not_inside, emit,
                     fail, handle_errors, info, make_progress, positive, warn)

Inputs = Annotated[list[str], typer.Argument(help="Image files or folders (recursive), or - to read paths from stdin.",
                                             show_default=False)]
OutDir = Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
SkipExisting = Annotated[bool, typer.Option("--skip-existing", help="Leave outputs that already exist (resume a batch).")]


class _Batch:
    """Progress bar, written paths on stdout as they land, failures on stderr, and the exit code."""

    def __init__(self, quiet: bool, as_json: bool, label: str) -> None:
        self.quiet, self.as_json, self.label = quiet, as_json, label
        self.progress = make_progress(quiet)
        self.task = None
        self.failed = 0

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "progress":
            if self.task is None:
                self.progress.start()
                self.task = self.progress.add_task(self.label, total=data["total"], status="")
            self.progress.update(self.task, completed=data["done"])
        elif event == "written":
            emit({"path": data["path"]} if self.as_json else data["path"], as_json=self.as_json)
        elif event == "failed":
            self.failed += 1
            reason = data["reason"]
            warn(reason if data["path"] in reason else f"{data['path']}: {reason}")

    def finish(self, outcome: Any = None) -> None:
        self.progress.stop()
        if outcome is not None and not self.quiet:
            info(f"{self.label}: {len(outcome.written)} written, {len(outcome.skipped)} skipped (existing), "
                 f"{self.failed} failed")
        if self.failed:
            raise fail(f"{self.failed} input(s) failed; see the warnings above", EXIT_PARTIAL)


def _open(checkpoint: Path, device: str):
    from ..checkpoint import load_model
    from ..ops import prepare
    from ..runtime import resolve_device

    return prepare(load_model(checkpoint, device=resolve_device(device)))


def _find(inputs: list[str]):
    from ..images import find_images

    return find_images(inputs, stdin=sys.stdin, on_warning=warn)


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def encode(
    checkpoint: Checkpoint,
    inputs: Inputs,
    output: Annotated[str, typer.Option("--output", "-o", help="Latents file (.safetensors), or - for JSON lines on stdout.")],
    sample: Annotated[bool, typer.Option("--sample", help="Also store a z drawn from each posterior.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help='One JSON object per image on stdout ({"path", "mu", "logvar"}).')] = False,
    batch_size: BatchSize = 64, device: Device = "auto", seed: Seed = 0, force: Force = False,
    quiet: Quiet = False, as_json: Json = False,
) -> None:
    """Encode images to their posterior means and log-variances (N x D) in a safetensors file."""
    with handle_errors():
        import torch

        from ..latents import save_latents
        from ..ops import stream_posteriors

        ckpt = _open(checkpoint, device)
        found = _find(inputs)
        stream = jsonl or output == "-"
        if not stream and Path(output).exists() and not force:
            raise fail(f"{output} already exists; pass --force to overwrite it")
        batch = _Batch(quiet, as_json, "encode")
        generator = torch.Generator().manual_seed(seed)
        rows: dict[str, list] = {"mu": [], "logvar": [], "z": []}
        items_all = []
        for items, _, mu, logvar in stream_posteriors(ckpt, found, batch_size=batch_size, callback=batch):
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator) if sample else None
            if stream:
                for i, item in enumerate(items):
                    record = {"path": str(item.path), "mu": mu[i].tolist(), "logvar": logvar[i].tolist()}
                    emit(record | ({"z": z[i].tolist()} if sample else {}), as_json=True)
                continue
            items_all += items
            rows["mu"].append(mu), rows["logvar"].append(logvar)
            if sample:
                rows["z"].append(z)
        if not stream and items_all:
            tensors = {k: torch.cat(v) for k, v in rows.items() if v}
            path = save_latents(output, tensors, paths=[str(i.path) for i in items_all],
                                relative=[str(i.relative) for i in items_all], identity=ckpt.identity,
                                config=ckpt.config.to_dict(), force=force)
            emit({"path": str(path), "count": len(items_all)} if as_json else path, as_json=as_json)
        batch.finish()


def decode(
    checkpoint: Checkpoint,
    latents: Annotated[Path, typer.Argument(help="A latents file from `vaetool encode`, or a .npy / .safetensors holding one N x D tensor.", show_default=False)],
    output: OutDir,
    key: Annotated[Optional[str], typer.Option("--key", help="Tensor to decode: mu (default), z or logvar; or the name in a plain file.")] = None,
    ext: Annotated[str, typer.Option("--ext", help="Output image format (extension).")] = "png",
    batch_size: BatchSize = 64, device: Device = "auto", seed: Seed = 0, force: Force = False,
    skip_existing: SkipExisting = False, quiet: Quiet = False, as_json: Json = False,
) -> None:
    """Decode latent vectors to images, named after the encoded images' paths (or an index)."""
    with handle_errors():
        from ..latents import load_latents
        from ..ops import write_decoded

        ckpt = _open(checkpoint, device)
        table = load_latents(latents, key=key)
        suffix = "." + ext.lstrip(".")
        if table.names and len(table.names) == len(table.values):
            paths = [output / Path(name).with_suffix(suffix) for name in table.names]
        else:
            paths = [output / f"{i:06d}{suffix}" for i in range(len(table.values))]
        batch = _Batch(quiet, as_json, "decode")
        outcome = write_decoded(ckpt, table.values, paths, batch_size=batch_size, force=force,
                                skip_existing=skip_existing, callback=batch, source=str(latents))
        batch.finish(outcome)


def sample(
    checkpoint: Checkpoint,
    output: OutDir,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many images.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", callback=positive, help="z ~ N(0, T^2 I); below 1 gives more typical, less varied images.")] = 1.0,
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write all samples as one grid image.")] = None,
    prefix: Annotated[str, typer.Option("--prefix", help="File name prefix.")] = "sample_",
    ext: Annotated[str, typer.Option("--ext", help="Output image format (extension).")] = "png",
    batch_size: BatchSize = 64, device: Device = "auto", seed: Seed = 0, force: Force = False,
    skip_existing: SkipExisting = False, quiet: Quiet = False, as_json: Json = False,
) -> None:
    """Draw new images from the prior; prints the written paths, one per line."""
    with handle_errors():
        from ..images import save_grid
        from ..ops import decode_images, prior_latents, write_decoded

        ckpt = _open(checkpoint, device)
        z = prior_latents(ckpt, count, temperature=temperature, seed=seed)
        paths = [output / f"{prefix}{i:05d}.{ext.lstrip('.')}" for i in range(count)]
        batch = _Batch(quiet, as_json, "sample")
        outcome = write_decoded(ckpt, z, paths, batch_size=batch_size, force=force, skip_existing=skip_existing,
                                callback=batch)
        batch.finish()
        if grid is not None:
            import math

            pixels = decode_images(ckpt, z)
            save_grid(grid, pixels, nrow=max(1, round(math.sqrt(count))), force=force)
            info(f"grid: {grid}", quiet=quiet)
        if outcome.failed:
            raise fail(f"{len(outcome.failed)} output(s) could not be written", EXIT_PARTIAL)


def _anchor(ckpt, text: str):
    """An interpolation anchor: an image's posterior mean, or a row of a latents file (`file.safetensors:3`)."""
    from ..api import VAEModel
    from ..errors import DataError
    from ..latents import load_latents, split_row_reference

    reference = split_row_reference(text)
    if reference is not None:
        path, row = reference
        values = load_latents(path).values
        if row >= len(values):
            raise DataError(f"{path} has {len(values)} rows; row {row} does not exist")
        return values[row]
    return VAEModel(ckpt).encode([text]).mu[0]


def interpolate(
    checkpoint: Checkpoint,
    anchors: Annotated[list[str], typer.Argument(help="Two or more images, or rows of a latents file (latents.safetensors:3).", show_default=False)],
    output: OutDir,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Frames per segment, endpoints included.")] = 8,
    method: Annotated[str, typer.Option("--method", help="slerp (default; Gaussian latents live near a sphere) or lerp.")] = "slerp",
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write the frames as one strip image.")] = None,
    gif: Annotated[Optional[Path], typer.Option("--gif", help="Also write an animated GIF of the frames.")] = None,
    fps: Annotated[int, typer.Option("--fps", min=1, help="GIF frames per second.")] = 12,
    batch_size: BatchSize = 64, device: Device = "auto", seed: Seed = 0, force: Force = False,
    quiet: Quiet = False, as_json: Json = False,
) -> None:
    """Walk the latent space through the posterior means of the given images; writes the frames."""
    if len(anchors) < 2:
        raise typer.BadParameter("give at least two images or latent rows", param_hint="ANCHORS")
    if method not in ("slerp", "lerp"):
        raise typer.BadParameter("use slerp or lerp", param_hint="--method")
    with handle_errors():
        import torch

        from ..images import save_grid
        from ..ops import decode_images, path_segments, write_decoded

        ckpt = _open(checkpoint, device)
        z = path_segments(torch.stack([_anchor(ckpt, a) for a in anchors]), steps=steps, method=method)
        paths = [output / f"frame_{i:04d}.png" for i in range(len(z))]
        batch = _Batch(quiet, as_json, "interpolate")
        outcome = write_decoded(ckpt, z, paths, batch_size=batch_size, force=force, callback=batch)
        batch.finish()
        frames = decode_images(ckpt, z) if (grid or gif) else None
        if grid is not None:
            save_grid(grid, frames, nrow=steps, force=force)
        if gif is not None:
            _write_gif(gif, frames, fps=fps, force=force)
        if outcome.failed:
            raise fail(f"{len(outcome.failed)} frame(s) could not be written", EXIT_PARTIAL)


def _write_gif(path: Path, frames, *, fps: int, force: bool) -> None:
    from PIL import Image

    from ..atomic import atomic_path

    arrays = (frames.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    pictures = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
    pictures += pictures[-2:0:-1]  # there and back again, so the loop has no jump
    with atomic_path(path, force=force) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=1000 // fps, loop=0)


def reconstruct(
    checkpoint: Checkpoint,
    inputs: Inputs,
    output: OutDir,
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write originals above reconstructions (the first 16).")] = None,
    ext: Annotated[Optional[str], typer.Option("--ext", help="Output format (extension); default: keep each input's.")] = None,
    batch_size: BatchSize = 64, device: Device = "auto", seed: Seed = 0, force: Force = False,
    skip_existing: SkipExisting = False, quiet: Quiet = False, as_json: Json = False,
) -> None:
    """Reconstruct images through the model (posterior mean), mirroring the input tree under OUTPUT."""
    check_not_inside(output, inputs, force=force)
    with handle_errors():
        from ..ops import check_outputs_apart, reconstruct_folder

        ckpt = _open(checkpoint, device)
        found = _find(inputs)
        check_outputs_apart(output, found, ext=ext)
        batch = _Batch(quiet, as_json, "reconstruct")
        outcome = reconstruct_folder(ckpt, found, output, batch_size=batch_size, ext=ext, force=force,
                                     skip_existing=skip_existing, grid=grid, callback=batch)
        batch.finish(outcome)


def traverse(
    checkpoint: Checkpoint,
    output: Annotated[Path, typer.Option("--output", "-o", help="The grid image to write.")],
    image: Annotated[Optional[Path], typer.Option("--image", help="Start from this image's posterior mean (default: z = 0).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Rank dimensions by their average KL over these images.")] = None,
    dims: Annotated[Optional[str], typer.Option("--dims", help="Comma-separated dimensions to show, in order (overrides the ranking).")] = None,
    rows: Annotated[int, typer.Option("--rows", min=1, help="How many dimensions (rows) to show.")] = 10,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Columns: values along each dimension.")] = 9,
    span: Annotated[float, typer.Option("--range", callback=positive, help="Sweep from -R to +R prior sigmas around the start.")] = 3.0,
    batch_size: BatchSize = 64, device: Device = "auto", seed: Seed = 0, force: Force = False,
    quiet: Quiet = False, as_json: Json = False,
) -> None:
    """A grid whose rows are latent dimensions and whose columns sweep each one: what each dimension controls."""
    with handle_errors():
        import torch

        from ..api import VAEModel
        from ..images import save_grid
        from ..ops import average_kl_per_dim, traverse_grid

        ckpt = _open(checkpoint, device)
        latent_dim = ckpt.config.latent_dim
        base = VAEModel(ckpt).encode([str(image)]).mu[0] if image else torch.zeros(latent_dim)
        ranking = None
        if dims:
            chosen = [int(d) for d in dims.split(",") if d.strip()]
            if any(d < 0 or d >= latent_dim for d in chosen):
                raise fail(f"--dims must lie in 0..{latent_dim - 1}")
        elif data:
            batch = _Batch(quiet, False, "rank")
            ranking = average_kl_per_dim(ckpt, _find(data), batch_size=batch_size, callback=batch)
            batch.progress.stop()
            chosen = torch.argsort(ranking, descending=True)[:rows].tolist()
        else:
            if latent_dim > rows:
                warn(f"showing dimensions 0..{rows - 1} of {latent_dim}; pass --data FOLDER to show the most used ones")
            chosen = list(range(min(rows, latent_dim)))
        pixels = traverse_grid(ckpt, base, chosen, steps=steps, span=span)
        path = save_grid(output, pixels, nrow=steps, force=force)
        if as_json:
            kl = {str(d): float(ranking[d]) for d in chosen} if ranking is not None else None
            emit({"path": str(path), "dims": chosen, "kl": kl}, as_json=True)
        else:
            info(f"rows are dimensions {', '.join(map(str, chosen))}", quiet=quiet)
            emit(path)
