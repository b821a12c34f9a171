"""`vaetool fit-prior`: fit a prior to a checkpoint's aggregate posterior and store it in the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import Display
from .options import (BATCH_SIZE, OUTPUT, BatchSize, Checkpoint, Device, Json, Quiet, Seed, Workers, flag,
                      force_option, inputs_argument)


def _components(value: str) -> str:
    """Option callback: auto, or a number of mixture components >= 1."""
    text = value.strip().lower()
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise typer.BadParameter(f"must be auto or a number of components (>= 1), not {value!r}")


Components = Annotated[str, typer.Option(
    "--components", "-k", callback=_components, metavar="auto|K",
    help="auto: the best of 1, 2, 4, 8, 16, 32 by the log-likelihood of held-out images' latents; K: that many.")]


def fit_prior(
    checkpoint: Checkpoint,
    data: inputs_argument("DATA"),
    components: Components = "auto",
    seed: Seed = 0,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", rich_help_panel=OUTPUT,
        help="Write the checkpoint with the prior here instead of into CHECKPOINT.")] = None,
    force: force_option("Overwrite an existing --output file.") = False,
    second_stage: flag("--second-stage", help="For a latent map (spatial family): train a small second VAE on the maps "
                       "and fit the mixture to its codes (Dai & Wipf 2019); its samples hold together where the "
                       "mixture's drift apart.") = False,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", min=1, help="Training steps of the second stage (default 3400; the same seed and steps give the "
        "same prior).")] = None,
    batch_size: BatchSize = BATCH_SIZE, device: Device = "auto", workers: Workers = None,
    as_json: Json = False, quiet: Quiet = False,
) -> None:
    """Fit a prior to the latents of the images a checkpoint was trained on, for samples that look like them.

    Encodes DATA to posterior means (of the top latent for a hierarchical model), fits a full-covariance Gaussian mixture to them by EM (with --second-stage, first a small VAE over a spatial model's maps, and the mixture to its codes), and stores it beside the weights, which stay as they are (so does the checkpoint's identity): in CHECKPOINT itself, atomically, or in --output. `vaetool train` does this at the end of a run; this is for checkpoints made before, or for another choice of --components.

    Prints the path written (a JSON object with the fit's figures with --json). Unreadable images are named on stderr and left out (exit code 3 at the end).
    """
    from ..training.fit_prior import fit_checkpoint_prior

    display = Display("fit-prior", quiet=quiet, as_json=as_json)
    try:
        fit_checkpoint_prior(checkpoint, data, components=None if components == "auto" else int(components),
                             seed=seed, output=output, force=force, batch_size=batch_size, device=device,
                             workers=workers, second_stage=second_stage, steps=steps, callback=display)
    finally:
        display.close()
    display.finish(summary=False)
