"""`vaetool eval`: likelihood and reconstruction quality of a checkpoint on a folder of images."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from .common import Display, emit
from .options import (BATCH_SIZE, BatchSize, Checkpoint, Device, Json, PriorChoice, Quiet, SamplePrior, Seed,
                      Temperature, TemperatureSpec, Workers, inputs_argument, temperature_value)


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
        ("family", r["family"]),
        ("active units", f"{r['active_units']} of {r['latent_dim']} in {_which(r)} (Var_x E_q[z_d] > 0.01)"),
    ]
    if len(r["levels"]) > 1:
        rows += [(f"level {name}", f"{'x'.join(map(str, v['shape']))}: KL {v['kl']:.3f} nats/image, "
                  f"{v['active_units']} of {v['units']} units active") for name, v in r["levels"].items()]
    rows.append(("bits/dim rule", r["bits_per_dim_convention"]))
    if r.get("samples"):
        rows += _sample_rows(r["samples"])
    return "\n".join(f"{name:<17}{value}" for name, value in rows)


def _which(r: dict[str, Any]) -> str:
    if r["active_units_of"] == "all levels":
        return "all latent elements"
    return f"level {r['active_units_of']}"


def _sample_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The sample metric: the two-sample test's scores and setup, and the nearest-image distances."""
    t, m = s["two_sample"], s["memorisation"]
    near = f", {m['near_fraction']:.0%} nearer than the closest 5% of real images" if m["near_fraction"] is not None \
        else ""
    reference = f"; real images: mean {m['reference_mean']:.4f}" if m["reference_mean"] is not None else ""
    return [
        ("samples", f"{s['samples']} from the {s['prior']} prior, temperature {_shown(s['temperature'])}, "
                    f"seed {s['seed']}"),
        ("C2ST accuracy", f"{t['accuracy']:.3f} ({_over_repeats(t, '; ')}0.5: indistinguishable; real "
                          f"{t['real_accuracy']:.3f}, samples {t['generated_accuracy']:.3f}), log-loss "
                          f"{t['log_loss']:.3f}, p {t['p_value']:.2g}"),
        ("C2ST setup", s["setup"]),
        *([("C2ST recon", _reconstruction_row(s["reconstructions"]))] if s.get("reconstructions") else []),
        ("nearest image", f"RMSE to {s['reference']}: mean {m['mean']:.4f}, median {m['median']:.4f}, "
                          f"min {m['min']:.4f}{reference}{near}"),
    ]


def _over_repeats(t: dict[str, Any], end: str) -> str:
    """The repeats' range, to go beside their mean, when there are several."""
    accuracies = t.get("accuracies") or ()
    return f"mean of {len(accuracies)} splits, {min(accuracies):.3f}-{max(accuracies):.3f}{end}" \
        if len(accuracies) > 1 else ""


def _reconstruction_row(t: dict[str, Any]) -> str:
    over = _over_repeats(t, "")
    return (f"{t['accuracy']:.3f}{f' ({over})' if over else ''} for reconstructions of half the evaluated images "
            f"against the other half (trained on {t['real_train']} + {t['generated_train']}): about the best a better "
            f"prior could give")


def _shown(temperature: float | dict[str, float]) -> str:
    if isinstance(temperature, dict):
        return ",".join(f"{name}={value:g}" for name, value in temperature.items())
    return f"{temperature:g}"


def eval_command(
    checkpoint: Checkpoint,
    data: inputs_argument("DATA"),
    iw_samples: Annotated[int, typer.Option("--iw-samples", "-k", min=1,
                                            help="Importance samples K per image for the IWAE bound.")] = 100,
    batch_size: BatchSize = BATCH_SIZE,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Also draw N samples from the prior and score "
                                         "them against the images (classifier two-sample test).")] = 0,
    train_data: Annotated[Optional[list[str]], typer.Option("--train-data", metavar="PATH", help="With --samples: "
                          "the training images, for each sample's distance to its nearest one (repeatable).")] = None,
    temperature: Temperature = TemperatureSpec("1"),
    prior: SamplePrior = PriorChoice.auto,
    c2st_repeats: Annotated[int, typer.Option("--c2st-repeats", min=1, help="With --samples: splits the two-sample "
                            "test averages, each cross-fitted (two classifiers: every image scored once).")] = 3,
    # 3: sample_metric.REPEATS, not imported here so that --help needs no torch
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Measure a checkpoint of any family on images: -ELBO, -log p(x), bits/dim, PSNR, SSIM.

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
    (Burda et al. 2015): for the vector level (a vector model's z, a hierarchy's
    top), else every element of a spatial map. Models with several levels get
    a line per level: its shape, KL and active units. The importance samples
    draw every level (a hierarchy's top-down); the KL of a level below the
    top is exact given the levels above, drawn once per image. The same
    --seed gives the same numbers, whatever the --batch-size.

    --samples N draws N images from the model's prior and trains a small
    classifier on half of them and half of the images given, scoring it on
    the other halves (Lopez-Paz & Oquab 2017): accuracy 0.5 means the samples
    cannot be told from the images. A second classifier trains on the other
    halves, so every image is scored once, and the score is the mean over
    --c2st-repeats such splits (their range is shown): with a few hundred
    images one split moves the score by up to a third. Each sample's
    distance (per-pixel RMSE) to its nearest --train-data image, beside the same for the real images,
    shows memorisation; without --train-data the distances are to half of
    the images given. The samples are drawn as `vaetool sample` draws them:
    --temperature and --prior mean the same there. The same test of the
    reconstructions of half the images given against the other half ("C2ST
    recon") shows what a better prior alone could reach: samples go through
    the same decoder, so when even the reconstructions are told apart, the
    decoder's blur sets the score.

    Prints a table on stdout (one JSON object with --json). Unreadable files
    are skipped with a warning each and make the exit status 3.
    """
    display = Display("eval", quiet=quiet)
    result = _run(checkpoint, data, iw_samples=iw_samples, batch_size=batch_size, seed=seed, device=device,
                  workers=workers, samples=samples, train_data=train_data, display=display,
                  sample_temperature=temperature_value(temperature), sample_prior=prior.value,
                  sample_repeats=c2st_repeats)
    summary = result.to_dict()
    emit(summary if as_json else _table(summary), as_json=as_json)
    display.finish(summary=False)  # exit 3 when some inputs could not be read


def _run(checkpoint, data: list[str], *, iw_samples: int, batch_size: int, seed: int, device: str,
         workers: int | None, samples: int, train_data: list[str] | None, display: Display,
         sample_temperature: float | dict[str, float], sample_prior: str, sample_repeats: int):
    from ..inference.evaluate import evaluate

    try:  # `-` among the inputs reads paths from stdin (find_images does it)
        return evaluate(checkpoint, data, iw_samples=iw_samples, batch_size=batch_size, seed=seed, device=device,
                        workers=workers, samples=samples, train_data=train_data, callback=display,
                        sample_temperature=sample_temperature, sample_prior=sample_prior,
                        sample_repeats=sample_repeats)
    finally:
        display.close()
