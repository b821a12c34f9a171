"""`vaetool encode`, `decode`, `sample`, `interpolate`, `reconstruct` and `traverse`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..events import Saved
from .common import Display, emit, fail, file_record, info, warn
from .denoise import ReconstructTile
from .options import (BATCH_SIZE, OUTPUT, BatchSize, Checkpoint, Device, DimList, Ext, Force, ImageFormat, Inputs,
                      Json, LevelsChoice, PathMethod, Precision, PrecisionOption, PriorChoice, Quiet, SamplePrior, Seed,
                      SkipExisting, Temperature, TemperatureSpec, flag, gif_file, image_file, latents_output,
                      parse_dims, positive, temperature_value, value_of)
from .single import MoveToTarget, scratch_beside, single_target, target_done

OutDir = Annotated[Path, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Output folder.")]
Grid = Annotated[Optional[Path], typer.Option("--grid", callback=image_file, rich_help_panel=OUTPUT,
                                              help="Also write the images as one grid image.")]
Format = Annotated[ImageFormat, typer.Option("--ext", case_sensitive=False, rich_help_panel=OUTPUT,
                                             help="Output image format.")]


def _open(checkpoint: Path, device: str):
    """The checkpoint for `reconstruct`, which handles the vector family only so far."""
    from ..inference.load import load_for_inference

    return load_for_inference(checkpoint, device=device)


def _open_any(checkpoint: Path, device: str):
    """The checkpoint for the latent commands, which handle every model family."""
    from ..inference.load import load_for_inference

    return load_for_inference(checkpoint, device=device)


def encode(
    checkpoint: Checkpoint,
    inputs: Inputs,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", callback=latents_output, show_default=False, rich_help_panel=OUTPUT,
        help="FILE.safetensors (each latent level's mu and logvar, and the image paths), FILE.npy (a vector model's "
             "mu only: one N x D array for numpy), FOLDER/ (FOLDER/latents.safetensors), or - for JSON lines.")] = None,
    sample: flag("--sample", help="Also store a z drawn from each posterior (--seed sets the draw).") = False,
    jsonl: flag("--jsonl", help='One JSON object per image on stdout ({"path", "mu", "logvar"}; with latent levels, '
                                'each is {level: flattened values} beside "shapes").', panel=OUTPUT) = False,
    seed: Seed = 0,
    force: Force = False, quiet: Quiet = False, as_json: Json = False,
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", precision: PrecisionOption = Precision.auto,
) -> None:
    """Encode images to each latent level's posterior means and log-variances in a safetensors file."""
    if output is None and not jsonl:
        raise typer.BadParameter("give -o FILE.safetensors, -o FILE.npy, or -o - / --jsonl for JSON lines",
                                 param_hint="'--output'")
    to_stdout = jsonl or output == "-"
    path = None if to_stdout else _latents_path(output)
    if path is not None and path.suffix.lower() == ".npy" and sample:
        raise typer.BadParameter(f"{path} holds one array (mu); write .safetensors to keep z as well",
                                 param_hint="'--sample'")
    from ..inference.latent_files import encode_to_npy, json_rows
    from ..inference.latent_ops import encode_rows, encode_to_file

    ckpt = _open_any(checkpoint, device)
    display = Display("encode", quiet=quiet, as_json=as_json)
    if to_stdout:
        for items, rows in encode_rows(ckpt, inputs, batch_size=batch_size, sample=sample, seed=seed,
                                       stdin=sys.stdin, callback=display, precision=precision.value):
            for obj in json_rows(ckpt, items, rows):
                emit(obj, as_json=True)
    else:
        write = encode_to_npy if path.suffix.lower() == ".npy" else encode_to_file
        written, count = write(ckpt, inputs, path, batch_size=batch_size, sample=sample, seed=seed, force=force,
                               stdin=sys.stdin, callback=display, precision=precision.value)
        if written is not None:
            emit(file_record(written, "latents", rows=count) if as_json else written, as_json=as_json)
    display.finish(summary=False)


def _latents_path(output: str) -> Path:
    """The latents file -o names: the file itself, or FOLDER/latents.safetensors for a folder."""
    path = Path(output)
    if output.endswith(("/", "\\")) or path.is_dir():
        return path / "latents.safetensors"
    return path


def decode(
    checkpoint: Checkpoint,
    latents: Annotated[Path, typer.Argument(metavar="LATENTS", show_default=False, help="A latents file from `vaetool encode`, or a .npy / .safetensors holding one N x D tensor.")],
    output: OutDir,
    key: Annotated[Optional[str], typer.Option("--key", help="What to decode: mu (default), z or logvar of every level; or the tensor's name in a plain file.")] = None,
    ext: Format = ImageFormat.png,
    force: Force = False, skip_existing: SkipExisting = False, quiet: Quiet = False, as_json: Json = False,
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", precision: PrecisionOption = Precision.auto,
) -> None:
    """Decode latents (every level, checked against the model) to images, named after the encoded images' paths."""
    from ..inference.latent_files import read_latents
    from ..inference.latent_ops import decoded_paths, write_decoded

    ckpt = _open_any(checkpoint, device)
    table = read_latents(ckpt, latents, key=key)
    made_by = table.metadata.get("checkpoint")
    if made_by and made_by != ckpt.identity:
        warn(f"{latents} was encoded by another checkpoint ({made_by}, this one is {ckpt.identity}); "
             f"the images will not match the encoded ones")
    paths = decoded_paths(output, table.names, table.count, ext=ext.value)
    display = Display("decode", quiet=quiet, as_json=as_json)
    write_decoded(ckpt, table.levels, paths, batch_size=batch_size, force=force, skip_existing=skip_existing,
                  callback=display, source=str(latents), precision=precision.value)
    display.finish()


def sample(
    checkpoint: Checkpoint,
    output: OutDir,
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many images.")] = 64,
    temperature: Temperature = TemperatureSpec("1"),
    prior: SamplePrior = PriorChoice.auto,
    seed: Seed = 0,
    grid: Grid = None,
    prefix: Annotated[str, typer.Option("--prefix", rich_help_panel=OUTPUT, help="File name prefix.")] = "sample_",
    ext: Format = ImageFormat.png,
    force: Force = False, skip_existing: SkipExisting = False, quiet: Quiet = False, as_json: Json = False,
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", precision: PrecisionOption = Precision.auto,
) -> None:
    """Draw new images from the prior (ancestrally, level by level, for a hierarchy); prints the written paths."""
    from ..inference.latent_files import save_grid
    from ..inference.latent_ops import decode_images, write_decoded
    from ..inference.latent_space import sample_latents

    ckpt = _open_any(checkpoint, device)
    z = sample_latents(ckpt, count, temperature=temperature_value(temperature), seed=seed, prior=prior.value,
                       batch_size=batch_size)
    paths = [output / f"{prefix}{i:05d}.{ext.value}" for i in range(count)]
    display = Display("sample", quiet=quiet, as_json=as_json)
    write_decoded(ckpt, z, paths, batch_size=batch_size, force=force, skip_existing=skip_existing,
                  callback=display, command="sample", precision=precision.value)
    if grid is not None:
        import math

        pixels = decode_images(ckpt, z, batch_size=batch_size, precision=precision.value)
        display(Saved(str(save_grid(grid, pixels, nrow=max(1, round(math.sqrt(count))), force=force)), "grid"))
    display.finish()


def interpolate(
    checkpoint: Checkpoint,
    anchors: Annotated[list[str], typer.Argument(metavar="ANCHORS", show_default=False, help="Two or more images, or rows of a latents file (latents.safetensors:3).")],
    output: OutDir,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Frames per segment, endpoints included.")] = 8,
    method: Annotated[PathMethod, typer.Option("--method", case_sensitive=False, help="slerp: Gaussian latents live near a sphere; lerp: straight lines.")] = PathMethod.slerp,
    levels: Annotated[LevelsChoice, typer.Option("--levels", case_sensitive=False, help="all: walk every latent level's posterior means; top (hierarchical): walk the top latent, the levels below from their conditional priors.")] = LevelsChoice.all,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="With --levels top: the std multiplier of the levels below (0: their prior means; above 0: drawn from a fixed seed, so a run repeats).")] = 0.0,
    grid: Grid = None,
    gif: Annotated[Optional[Path], typer.Option("--gif", callback=gif_file, rich_help_panel=OUTPUT, help="Also write an animated GIF of the frames.")] = None,
    fps: Annotated[int, typer.Option("--fps", min=1, rich_help_panel=OUTPUT, help="GIF frames per second.")] = 12,
    force: Force = False, quiet: Quiet = False, as_json: Json = False,
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", precision: PrecisionOption = Precision.auto,
) -> None:
    """Walk the latent space through the posterior means of the given images; writes the frames."""
    if len(anchors) < 2:
        raise typer.BadParameter("give at least two images or latent rows", param_hint="'ANCHORS'")
    from ..inference.latent_files import anchor_latents, save_grid, write_gif
    from ..inference.latent_ops import decode_images, write_decoded
    from ..inference.latent_space import count_of, interpolate_latents

    ckpt = _open_any(checkpoint, device)
    z = interpolate_latents(ckpt, anchor_latents(ckpt, anchors), steps=steps, method=method.value,
                            levels=levels.value, temperature=temperature, seed=0)
    paths = [output / f"frame_{i:04d}.png" for i in range(count_of(z))]
    display = Display("interpolate", quiet=quiet, as_json=as_json)
    write_decoded(ckpt, z, paths, batch_size=batch_size, force=force, callback=display, command="interpolate",
                  precision=precision.value)
    frames = decode_images(ckpt, z, batch_size=batch_size, precision=precision.value) if (grid or gif) else None
    if grid is not None:
        display(Saved(str(save_grid(grid, frames, nrow=steps, force=force)), "grid"))
    if gif is not None:
        write_gif(gif, frames, fps=fps, force=force)
        display(Saved(str(gif), "gif"))
    display.finish()


def reconstruct(
    checkpoint: Checkpoint,
    inputs: Inputs,
    output: Annotated[Path, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Output folder, mirroring the input tree; for one input file, a file name with an image extension writes that file.")],
    grid: Annotated[Optional[Path], typer.Option("--grid", callback=image_file, rich_help_panel=OUTPUT, help="Also write originals above reconstructions (the first 16).")] = None,
    ext: Ext = None,
    force: Force = False, skip_existing: SkipExisting = False, quiet: Quiet = False, as_json: Json = False,
    tile: ReconstructTile = "auto",
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", precision: PrecisionOption = Precision.auto,
) -> None:
    """Reconstruct images through the model (posterior mean), mirroring the input tree under OUTPUT.

    A vector model reconstructs each image at its training size; a spatial or hierarchical one takes each image whole at its own size (gray, colour, alpha and 16-bit kept as `denoise` keeps them).
    """
    target = single_target(inputs, output)
    if target is not None and ext is not None:
        raise typer.BadParameter(f"-o {output} names the output file; drop --ext", param_hint="'-o'")
    if target is not None and skip_existing and target_done(target):
        info(f"{target} already exists; skipped", quiet=quiet)
        return
    from ..inference.load import load_for_inference
    from ..inference.reconstruct import reconstruct_folder

    ckpt = load_for_inference(checkpoint, device=device)
    suffix = value_of(ext) if target is None else target.suffix.lstrip(".").lower()
    folder = contextlib.nullcontext(output) if target is None else scratch_beside(Path(inputs[0]), target, force=force)
    display = Display("reconstruct", quiet=quiet, as_json=as_json)
    with folder as out_dir:
        callback = display if target is None else MoveToTarget(display, target, force=force)
        reconstruct_folder(ckpt, inputs, out_dir, batch_size=batch_size, ext=suffix, force=force, tile=tile,
                           skip_existing=skip_existing, grid=grid, precision=precision.value, stdin=sys.stdin,
                           callback=callback)
    display.finish()


def traverse(
    checkpoint: Checkpoint,
    output: Annotated[Path, typer.Option("--output", "-o", callback=image_file, rich_help_panel=OUTPUT, help="The grid image to write.")],
    image: Annotated[Optional[Path], typer.Option("--image", help="Start from this image's posterior mean (default: z = 0).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Rank dimensions by their average KL over these images.")] = None,
    dims: Annotated[Optional[DimList], typer.Option("--dims", parser=parse_dims, metavar="D,D,...", help="Dimensions to show, in order (overrides the ranking).")] = None,
    rows: Annotated[int, typer.Option("--rows", min=1, help="How many dimensions (rows) to show.")] = 10,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Columns: values along each dimension.")] = 9,
    span: Annotated[float, typer.Option("--range", callback=positive, help="Sweep from -R to +R prior sigmas around the start.")] = 3.0,
    force: Force = False, quiet: Quiet = False, as_json: Json = False,
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", precision: PrecisionOption = Precision.auto,
) -> None:
    """A grid whose rows are the latent vector's dimensions (a hierarchy's top; the levels below at their
    conditional prior means) and whose columns sweep each one: what each dimension controls."""
    import torch

    from ..inference.latent_files import image_means, save_grid
    from ..inference.latent_ops import average_kl_per_dim, check_precision, traverse_grid
    from ..inference.latent_space import vector_level

    ckpt = _open_any(checkpoint, device)
    level = vector_level(ckpt)  # a spatial model has none: one line saying so, before any work
    check_precision(ckpt, precision.value)  # a bad precision too
    latent_dim = ckpt.config.latent_dim
    base = image_means(ckpt, [image])[level][0] if image else torch.zeros(latent_dim)
    ranking, ranked = None, Display("rank", quiet=quiet)
    if dims:
        chosen = list(dims)
        if max(chosen) >= latent_dim:
            raise fail(f"--dims must lie in 0..{latent_dim - 1}")
    elif data:
        ranking = average_kl_per_dim(ckpt, data, batch_size=batch_size, stdin=sys.stdin, callback=ranked)
        ranked.close()
        chosen = torch.argsort(ranking, descending=True)[:rows].tolist()
    else:
        if latent_dim > rows:
            warn(f"showing dimensions 0..{rows - 1} of {latent_dim}; pass --data FOLDER to show the most used ones")
        chosen = list(range(min(rows, latent_dim)))
    pixels = traverse_grid(ckpt, base, chosen, steps=steps, span=span, precision=precision.value)
    path = save_grid(output, pixels, nrow=steps, force=force)
    if as_json:
        kl = {str(d): float(ranking[d]) for d in chosen} if ranking is not None else None
        emit(file_record(path, "grid", dims=chosen, kl=kl), as_json=True)
    else:
        info(f"rows are dimensions {', '.join(map(str, chosen))}", quiet=quiet)
        emit(path)
    ranked.finish(summary=False)  # exit 3 when some images under --data could not be read
