"""`vaetool denoise`: denoise folders of images with a (denoising) VAE checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import Checkpoint, Device, Display, Json, Quiet, handle_errors


def _tile(value: str) -> str:
    """Option callback: auto, off, or a positive number of pixels."""
    text = value.strip().lower()
    if text in ("auto", "off") or (text.isdigit() and int(text) >= 2):
        return text
    raise typer.BadParameter(f"must be auto, off or a tile size in pixels (>= 2), not {value!r}")


Tile = Annotated[str, typer.Option(
    callback=_tile, help="auto: overlapping tiles of the model's size, blended with a smooth window; N: tiles of N "
                         "px, each resized to the model's size and back; off: the whole image resized to the "
                         "model's size and back (loses detail).")]
TileBatch = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Tiles per forward pass; tiles of many "
                                                                          "images are batched together.")]


def denoise(
    checkpoint: Checkpoint,
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders (recursive), or - to read paths "
                                                     "from stdin.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder; the input tree is mirrored "
                                                                "under it (subfolders and names kept).")],
    tile: Tile = "auto",
    overlap: Annotated[float, typer.Option(min=0.0, max=0.9, help="Fraction of a tile shared with its "
                                                                  "neighbour.")] = 0.25,
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="1: fully denoised; 0: the input unchanged; "
                                                                   "in between, a blend of the two.")] = 1.0,
    ext: Annotated[Optional[str], typer.Option("--ext", help="Write this format (png, jpg, tif, webp, ...) "
                                                             "instead of each input's own.")] = None,
    suffix: Annotated[str, typer.Option("--suffix", help="Added to each output name before the extension, "
                                                         "e.g. _denoised.")] = "",
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Leave outputs that already exist: "
                                                                        "resumes an interrupted run.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs, and allow an output "
                                                              "folder inside an input folder (an input file is "
                                                              "never overwritten).")] = False,
    batch_size: TileBatch = 64,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16, "
                                                "fp16.")] = "auto",
    workers: Annotated[Optional[int], typer.Option(min=1, help="Threads decoding and writing images "
                                                                "(default: all cores).")] = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Denoise images with a VAE checkpoint, writing a mirrored tree of images under OUTPUT.

    Images of any size are denoised in overlapping tiles of the model's size; grayscale stays grayscale, an alpha channel is passed through, 16-bit grayscale PNG/TIFF keeps its depth. Written paths go to stdout; a file that fails is named on stderr and the rest go on (exit code 3 at the end).

    Note: a checkpoint trained with `vaetool train --corrupt ...` (e.g. --corrupt gaussian:0.05-0.2) is a denoiser. One trained without --corrupt works too, but then this is a plain VAE reconstruction: it smooths rather than removes the noise it was never shown.
    """
    with handle_errors():
        _run_denoise(locals())


def _run_denoise(o: dict[str, Any]) -> None:
    import sys

    from ..inference.denoise import denoise_files

    display = Display("denoise", quiet=o["quiet"], as_json=o["as_json"])
    try:
        denoise_files(
            o["checkpoint"], o["inputs"], o["output"], tile=o["tile"], overlap=o["overlap"], strength=o["strength"],
            batch_size=o["batch_size"], ext=o["ext"], suffix=o["suffix"], skip_existing=o["skip_existing"],
            force=o["force"], device=o["device"], precision=o["precision"], workers=o["workers"], stdin=sys.stdin,
            callback=display)
    finally:
        display.close()
    display.finish()
