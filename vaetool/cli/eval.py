"""`vaetool eval`: likelihood and reconstruction quality of a checkpoint on a folder of images."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .common import Display, emit
from .options import BATCH_SIZE, BatchSize, Checkpoint, Device, Json, Quiet, Seed, Workers, inputs_argument


def _table(r: dict[str, Any]) -> str:
    """The human-readable result, one quantity per line."""
    unit = "nats/image"
    scale = f" (decoder scale {r['decoder_scale']:.4g})" if r["decoder_scale"] is not None else ""
    skipped = f" ({len(r['failures'])} skipped)" if r["failures"] else ""
    rows = [
        ("checkpoint", str(r["checkpoint"])),
        ("images", f"{r['images']}{skipped}, {r['dims']} dimensions each"),
        ("likelihood", f"{r['likelihood']}{scale}"),
        ("-ELBO", f"{r['neg_elbo']:.3f} {unit} (reconstruction {r['recon']:.3f} + KL {r['kl']:.3f})"),
        ("-log p(x) IWAE", f"{r['iwae_nll']:.3f} {unit} (K = {r['iw_samples']}, "
                            f"standard error {r['iwae_nll_sem']:.3f})"),
        ("bits/dim", f"{r['bits_per_dim']:.4f} (IWAE), {r['elbo_bits_per_dim']:.4f} (-ELBO)"),
        ("MSE", f"{r['mse']:.6f}"),
        ("PSNR", f"{r['psnr']:.3f} dB"),
        ("SSIM", f"{r['ssim']:.4f}"),
        ("active units", f"{r['active_units']} of {r['latent_dim']} (Var_x E_q[z_d] > 0.01)"),
        ("bits/dim rule", r["bits_per_dim_convention"]),
    ]
    return "\n".join(f"{name:<17}{value}" for name, value in rows)


def eval_command(
    checkpoint: Checkpoint,
    data: inputs_argument("DATA"),
    iw_samples: Annotated[int, typer.Option("--iw-samples", "-k", min=1,
                                            help="Importance samples K per image for the IWAE bound.")] = 100,
    batch_size: BatchSize = BATCH_SIZE,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Measure a checkpoint on images: -ELBO, -log p(x), bits/dim, PSNR, SSIM.

    Likelihoods are nats per image (summed over pixels). -log p(x) is the
    importance-weighted bound of Burda et al. 2015 with K samples from q(z|x):
    an upper bound that tightens as K grows (K = 1 is the -ELBO). The -ELBO's
    reconstruction term averages the same K samples; its KL is exact.

    Bits/dim for Gaussian and Laplace decoders: pixels are 8-bit, x = k/255 in
    [0, 1]; with uniform dequantization the density on [0, 256)^D is
    p(x) / 256^D, so bits/dim = (-log p(x) + D ln 256) / (D ln 2), with
    D = channels x height x width. The density is taken at the bin's point
    k/255 (a choice; (k + 0.5)/256 is another). Bernoulli decoders on binary
    images: bits/dim = -log p(x) / (D ln 2), no dequantization term.

    MSE, PSNR and SSIM (Gaussian window 11x11, sigma 1.5) compare each image
    with its reconstruction from the posterior mean. Active units: latent
    dimensions whose posterior mean varies over the images by more than 0.01
    (Burda et al. 2015). The same --seed and --batch-size give the same numbers.

    Prints a table on stdout (one JSON object with --json). Unreadable files
    are skipped with a warning each and make the exit status 3.
    """
    display = Display("eval", quiet=quiet)
    result = _run(checkpoint, data, iw_samples=iw_samples, batch_size=batch_size, seed=seed, device=device,
                  workers=workers, display=display)
    summary = result.to_dict()
    emit(summary if as_json else _table(summary), as_json=as_json)
    display.finish(summary=False)  # exit 3 when some inputs could not be read


def _run(checkpoint, data: list[str], *, iw_samples: int, batch_size: int, seed: int, device: str,
         workers: int | None, display: Display):
    from ..inference.evaluate import evaluate

    try:  # `-` among the inputs reads paths from stdin (find_images does it)
        return evaluate(checkpoint, data, iw_samples=iw_samples, batch_size=batch_size, seed=seed, device=device,
                        workers=workers, callback=display)
    finally:
        display.close()
