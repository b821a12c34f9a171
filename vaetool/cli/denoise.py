"""`vaetool denoise`: denoise folders of images with a (denoising) VAE checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import Display, info
from .options import (BATCH_SIZE, OUTPUT, PERFORMANCE, Checkpoint, Device, Ext, ImageFormat, Inputs, Json, Precision,
                      PrecisionOption, Quiet, SkipExisting, batch_size_option, force_option, seed_option, value_of,
                      workers_option)
from .single import MoveToTarget, scratch_beside, single_target, target_done


ESTIMATE = "Estimate"


def tile_value(value: str) -> str:
    """Option callback: auto, off, or a positive number of pixels."""
    text = value.strip().lower()
    if text in ("auto", "off") or (text.isdigit() and int(text) >= 2):
        return text
    raise typer.BadParameter(f"must be auto, off or a tile size in pixels (>= 2), not {value!r}")


Tile = Annotated[str, typer.Option(
    callback=tile_value, metavar="auto|off|N", rich_help_panel=PERFORMANCE,
    help="Vector models: auto is overlapping tiles of the model's size, blended with a smooth window; N: tiles of N "
         "px, each resized to the model's size and back; off: the whole image resized (loses detail). Spatial and "
         "hierarchical models: auto runs each image whole at its own size, in blended tiles only above 2048x2048 px; "
         "off: always whole; N: tiles of N px, not resized.")]

ReconstructTile = Annotated[str, typer.Option(
    "--tile", callback=tile_value, metavar="auto|off|N", rich_help_panel=PERFORMANCE,
    help="Spatial and hierarchical models: auto runs each image whole at its own size, in blended tiles only "
         "above a memory bound (2048x2048 px); off: always whole; N: tiles of N px.")]


def denoise(
    checkpoint: Checkpoint,
    inputs: Inputs,
    output: Annotated[Path, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Output folder; the input tree is mirrored under it (subfolders and names kept). For one input file, a file name with an image extension writes that file.")],
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="1: fully denoised; 0: the input unchanged; in between, a blend of the two.")] = 1.0,
    ext: Ext = None,
    suffix: Annotated[str, typer.Option("--suffix", rich_help_panel=OUTPUT, help="Added to each output name before the extension, e.g. _denoised.")] = "",
    skip_existing: SkipExisting = False,
    force: force_option("Overwrite existing outputs, and allow an output folder inside an input folder (an input file is never overwritten).") = False,
    as_json: Json = False,
    quiet: Quiet = False,
    tile: Tile = "auto",
    overlap: Annotated[float, typer.Option(min=0.0, max=0.9, rich_help_panel=PERFORMANCE, help="Fraction of a tile shared with its neighbour.")] = 0.25,
    batch_size: batch_size_option("Tiles per forward pass; tiles of many images are batched together.") = BATCH_SIZE,
    device: Device = "auto",
    precision: PrecisionOption = Precision.auto,
    workers: workers_option("Threads decoding and writing images (default: all cores).") = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=0, rich_help_panel=ESTIMATE, help="The MMSE estimate: the mean of K posterior samples' decodes; 0: the decode of the posterior mean (fast). Default: 0 with the Wiener step (the posterior mean is its better pilot); without it, 16 for a model trained with --noise-model, or with --corrupt at --beta 1, else 0 (a --corrupt model's default --beta 0.01 leaves a narrow posterior).")] = None,
    diverse: Annotated[Optional[tuple[int, Path]], typer.Option("--diverse", metavar="N DIR", rich_help_panel=ESTIMATE, help="Also write N plausible clean versions of each image (single posterior samples) under DIR, mirroring the tree: stem_1.png ... stem_N.png.")] = None,
    seed: seed_option(ESTIMATE) = 0,
    wiener: Annotated[Optional[bool], typer.Option("--wiener/--no-wiener", metavar="", rich_help_panel=ESTIMATE, help="The Wiener step: keep each 8x8 block's DCT coefficients of the noisy image in the proportion the model's estimate has signal there, so the detail a decode loses comes back and the noise goes (BM3D's second stage, with the model as its pilot; see --block-matching). Default: on for a model trained on Gaussian noise (--noise-model gaussian, or --corrupt gaussian:...), off otherwise.", show_default=False)] = None,
    block_matching: Annotated[bool, typer.Option("--block-matching/--no-block-matching", metavar="", rich_help_panel=ESTIMATE, help="The Wiener step's last pass filters each block together with the 7 blocks most like it nearby (BM3D's collaborative filtering): 0.0-1.6 dB better on held-out images; --no-block-matching is about 5 times faster end to end.")] = True,
    mirror: Annotated[Optional[bool], typer.Option("--mirror/--no-mirror", metavar="", rich_help_panel=ESTIMATE, help="Average the model's estimates of each image and of its mirror image (mirrored back): a self-ensemble for a model trained on mirrored images too. Default: on for a model trained with --flip (a denoiser's default), off otherwise; the model's time doubles.", show_default=False)] = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", rich_help_panel=ESTIMATE, help="The inputs' noise std for the Wiener step, on the 0-1 scale or the 0-255 one above 1 (25). Default: the model's noise model's sigma, else estimated from each image.")] = None,
) -> None:
    """Denoise images with a VAE checkpoint, writing a mirrored tree of images under OUTPUT.

    Images of any size are denoised: whole at their own size by a spatial or hierarchical model, in overlapping tiles of the model's size by a vector one; grayscale stays grayscale, an alpha channel is passed through, 16-bit grayscale PNG/TIFF keeps its depth. Written paths go to stdout; a file that fails is named on stderr and the rest go on (exit code 3 at the end). `denoise CKPT page.png -o page_clean.png` writes that one file.

    Note: a checkpoint trained with `vaetool train --corrupt ...` (e.g. --corrupt gaussian:0.05-0.2) is a denoiser, and so is one trained on the noisy images themselves with `--noise-model gaussian` (for both the output is the MMSE estimate, see --samples). One trained without either works too, but then this is a plain VAE reconstruction: it smooths rather than removes the noise it was never shown.
    """
    if diverse is not None and diverse[0] < 1:
        raise typer.BadParameter(f"N must be at least 1, not {diverse[0]}", param_hint="'--diverse'")
    estimate = {"samples": samples, "seed": seed, "diverse": diverse[0] if diverse else 0,
                "diverse_dir": diverse[1] if diverse else None, "wiener": wiener, "block_matching": block_matching,
                "mirror": mirror,
                "sigma": None if sigma is None else sigma / 255.0 if sigma >= 1 else sigma}
    target = single_target(inputs, output)
    if target is not None:
        if ext is not None or suffix:
            raise typer.BadParameter(f"-o {output} names the output file; drop {'--ext' if ext else '--suffix'}",
                                     param_hint="'-o'")
        if skip_existing and target_done(target):
            info(f"{target} already exists; skipped", quiet=quiet)
            return
        ext = ImageFormat(target.suffix.lstrip(".").lower())
    folder = contextlib.nullcontext(output) if target is None else scratch_beside(Path(inputs[0]), target, force=force)
    with folder as out_dir:
        _run_denoise(checkpoint, inputs, out_dir, tile=tile, overlap=overlap, strength=strength, batch_size=batch_size,
                     ext=value_of(ext), suffix=suffix, skip_existing=skip_existing, force=force, device=device,
                     precision=precision.value, workers=workers, quiet=quiet, as_json=as_json, target=target,
                     estimate=estimate)


def _run_denoise(checkpoint: Path, inputs: list[str], output: Path, *, tile: str, overlap: float, strength: float,
                 batch_size: int, ext: str | None, suffix: str, skip_existing: bool, force: bool, device: str,
                 precision: str, workers: int | None, quiet: bool, as_json: bool, target: Path | None,
                 estimate: dict[str, Any]) -> None:
    import sys

    from ..events import Written
    from ..inference.denoise import denoise_files

    display = Display("denoise", quiet=quiet, as_json=as_json)
    callback = display
    if target is not None:
        mover = MoveToTarget(display, target, force=force)

        def callback(event: Any) -> Any:  # only the file in the scratch folder is the target; --diverse's stay
            inside = isinstance(event, Written) and Path(event.output).parent == output
            return mover(event) if inside or not isinstance(event, Written) else display(event)
    try:
        denoise_files(
            checkpoint, inputs, output, tile=tile, overlap=overlap, strength=strength, batch_size=batch_size,
            ext=ext, suffix=suffix, skip_existing=skip_existing, force=force, device=device, precision=precision,
            workers=workers, stdin=sys.stdin, callback=callback, **estimate)
    finally:
        display.close()
    display.finish()
