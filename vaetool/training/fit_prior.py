"""Fitting a prior to the aggregate posterior after training: encode the images, fit the mixture, store it.

A VAE's posterior means do not fill N(0, I), so sampling from where they are gives images that look
like the data ("ex-post density estimation", Ghosh et al. 2020; the mixture itself is models/prior.py).
The trainer fits one for the run's checkpoints at the end; `vaetool fit-prior` fits one for a
checkpoint made before. Both go through `fit_prior`, a function of the latents alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import checkpoint as ckpt
from ..errors import ConfigError, DataError, OutputError
from ..events import Callback, Note, Progress, Started, Written, ignore
from ..io.batches import iter_batches
from ..io.decode import to_float
from ..io.find import find_images
from ..models.base import VAEFamily
from ..models.prior import FittedPrior, prior_level, select_mixture

if TYPE_CHECKING:
    from .second_stage import SecondStageFit

CANDIDATES = (1, 2, 4, 8, 16, 32)  # mixture sizes tried by held-out likelihood
# EM's cost grows with the number of latents; past this many a seeded random subset is fitted, which
# estimates 32 full covariances of 128 dimensions well and keeps the fit to seconds on a CPU.
MAX_LATENTS = 10_000
PATIENCE = 1  # stop at the first size that scores below the best so far: the next sizes cost the most
HELD_OUT = 0.2  # the share of latents that scores each mixture size
# The end of a run fits a prior to a spatial model's map only up to this many numbers per image (a 128 px image
# at f = 4 with 8 channels): its principal directions come from an SVD of every latent, whose cost grows with
# the map, and a denoiser's f = 2 map (16,384 at 64 px), made to denoise, is not worth that wait.
# On the detail-rich set the fitted prior's samples beat N(0, I)'s by eye and by the two-sample test (BENCHMARKS.md).
MAX_MAP_NUMBERS = 8192
MIN_LATENTS = 10  # fewer cannot both fit a mixture and score it on held-out latents


@dataclass(frozen=True)
class PriorFit:
    """A fitted prior and how it compares with the standard normal on the same latents."""

    prior: FittedPrior
    latents: int  # how many posterior means the mixture saw
    standard: float  # mean log N(z; 0, I) of those latents, nats: the score to beat

    def describe(self) -> dict[str, object]:
        return self.prior.describe() | {"latents": self.latents, "standard_normal_log_likelihood": self.standard}

    def message(self) -> str:
        """One line: what was chosen and by how much it beats N(0, I)."""
        p = self.prior
        tried = ", ".join(f"{k}: {v:.1f}" for k, v in sorted(p.scores.items()))
        return (f"fitted prior on latent {p.level} {tuple(p.shape)}: {p.components} component(s) chosen by held-out "
                f"log-likelihood {p.held_out:.1f} nats per latent (N(0, I): {self.standard:.1f}; tried {tried}) "
                f"from {self.latents} posterior means")


@torch.no_grad()
def posterior_means(model: VAEFamily, batches: Iterable[torch.Tensor], *, level: str,
                    device: torch.device | str, flip: bool = False) -> torch.Tensor:
    """The posterior means of one latent level for uint8 image batches (B, C, H, W): (N, *shape) float32 on the CPU.

    With `flip`, the mirrored images' means are added too (a run trained with --flip saw those).
    """
    was_training = model.training
    model.eval()
    means = []
    for batch in batches:
        if len(batch) == 0:
            continue
        x = to_float(batch, device)  # (B, C, H, W)
        for view in (x, x.flip(-1)) if flip else (x,):
            means.append(model.encode(view.contiguous(memory_format=torch.channels_last)).mode()[level].float().cpu())
    model.train(was_training)
    if not means:
        return torch.zeros(0)
    return torch.cat(means)


def standard_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per latent (N,), nats."""
    flat = z.double().flatten(1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


def fit_prior(latents: torch.Tensor, *, level: str, components: int | None = None, seed: int = 0) -> PriorFit:
    """A mixture for latents (N, *shape): `components` of them, or the best of CANDIDATES by held-out likelihood.

    The sizes are tried in increasing order until one scores below the best so far. Either way a
    fifth of the latents is held out to score it, and the chosen size is refitted on all.
    """
    n = latents.shape[0] if latents.ndim > 1 else 0
    if n < MIN_LATENTS:
        raise DataError(f"fitting a prior needs the latents of at least {MIN_LATENTS} images, got {n}; "
                        f"give more images")
    generator = torch.Generator().manual_seed(seed)
    if n > MAX_LATENTS:
        latents = latents[torch.randperm(n, generator=generator)[:MAX_LATENTS]]
    fitted_on = len(latents) - max(1, round(HELD_OUT * len(latents)))  # as select_mixture splits them
    if components is not None and not 1 <= components <= fitted_on // 2:
        raise ConfigError(f"{components} components cannot be fitted to the latents of {n} images (at most "
                          f"{fitted_on // 2}); give fewer components or more images")
    candidates = CANDIDATES if components is None else (components,)
    prior = select_mixture(latents, candidates=candidates, held_out=HELD_OUT, generator=generator, patience=PATIENCE,
                           level=level)
    return PriorFit(prior, len(latents), float(standard_log_prob(latents).mean()))


def model_prior_level(model: VAEFamily) -> str:
    """The level a fitted prior models for this model (the only one, or the hierarchy's top)."""
    size = model.config.image_size
    return prior_level(list(model.latent_shapes(size, size)))


# ------------------------------------------------------------------------------ after training


PRIOR_KINDS = ("auto", "mixture", "second-stage", "none")  # train --prior
# With --time and a second stage, this share of the budget is the second stage's, so the whole run keeps to
# --time: at 3 minutes a spatial model trained for 2 and its second stage for 1 sampled better than the vector
# family in 3 (BENCHMARKS.md, "The spatial family as the default"). Without --time the second stage trains a
# number of steps after the run (the trainer's SECOND_STAGE_PER_STEP).
SECOND_STAGE_SHARE = 1 / 3


def planned_prior(kind: str, model: VAEFamily, *, emit: Callback = ignore) -> str | None:
    """What the end of a run fits for `train --prior KIND`: "mixture", "second-stage", or None.

    auto is a second stage for a latent map (the spatial family) and a mixture for a vector level (the
    vector family, the hierarchy's top). A map above MAX_MAP_NUMBERS numbers per image gets neither.
    """
    if kind not in PRIOR_KINDS:
        raise ConfigError(f"unknown prior {kind!r}; use one of {', '.join(PRIOR_KINDS)}")
    if kind == "none":
        return None
    level, size = model_prior_level(model), model.config.image_size
    shape = model.latent_shapes(size, size)[level]
    is_map = len(shape) == 3
    if kind == "second-stage" and not is_map:
        raise ConfigError(f"--prior second-stage is for latent maps; this {model.config.kind} model's latent {level} "
                          f"is a vector, which the mixture (--prior mixture, the default) models")
    if is_map and math.prod(shape) > MAX_MAP_NUMBERS:
        emit(Note(f"no prior is fitted at the end of training: the latent map has {math.prod(shape)} numbers per "
                  f"image (above {MAX_MAP_NUMBERS}); `vaetool fit-prior` fits one"))
        return None
    if kind == "auto":
        return "second-stage" if is_map else "mixture"
    return kind


def fit_run_priors(run_dir: Path, pixels: torch.Tensor, index: torch.Tensor, *, batch: int, seed: int,
                   device: torch.device, flip: bool, kind: str = "mixture", steps: int | None = None,
                   seconds: float | None = None, amp: torch.dtype | None = None,
                   emit: Callback = ignore) -> PriorFit | SecondStageFit | None:
    """Fit a prior of `kind` (a `planned_prior`) for each checkpoint of a run (model and last) on the training
    images and store it in the file.

    `pixels` is the uint8 image cache (N, C, H, W) and `index` the training rows. Checkpoints with the
    same weights share one fit. A second stage trains for `steps` (or until `seconds` pass) on
    model.safetensors' maps; a last.safetensors with other weights gets a mixture, which costs
    seconds, rather than a second budget. Returns model.safetensors' fit (None with too few images).
    """
    from .second_stage import STEPS, fit_second_stage

    fits: dict[str, PriorFit | SecondStageFit] = {}
    result = None
    for name in (ckpt.MODEL_FILE, ckpt.LAST_FILE):
        path = run_dir / name
        if not path.exists():
            continue
        loaded = ckpt.load_model(path, device=device)
        level = model_prior_level(loaded.model)
        fit = fits.get(loaded.identity)
        if fit is None:
            batches = (pixels[index[start: start + batch]] for start in range(0, len(index), batch))
            latents = posterior_means(loaded.model, batches, level=level, device=device, flip=flip)
            if len(latents) < MIN_LATENTS:
                emit(Note(f"no prior fitted: {len(latents)} training images are too few (at least {MIN_LATENTS})"))
                return None
            if kind == "second-stage" and not fits:
                fit = fit_second_stage(latents, level=level, steps=steps or (None if seconds else STEPS),
                                       seconds=seconds, seed=seed, device=device, amp=amp, emit=emit)
            else:
                fit = fit_prior(latents, level=level, seed=seed)
                emit(Note(fit.message()))
            fits[loaded.identity] = fit
        ckpt.save_prior(path, fit.prior)
        result = result or fit
    return result


# ------------------------------------------------------------------------------ for a checkpoint made before


def fit_checkpoint_prior(checkpoint: str | os.PathLike, data: Sequence[str | os.PathLike], *,
                         components: int | None = None, seed: int = 0, output: str | os.PathLike | None = None,
                         force: bool = False, batch_size: int = 64, device: str = "auto", workers: int | None = None,
                         second_stage: bool = False, steps: int | None = None,
                         callback: Callback = ignore) -> tuple[Path, PriorFit | SecondStageFit]:
    """Fit a prior to the posterior means of the images under `data` and store it in `checkpoint` (or `output`).

    The prior is a mixture, or with `second_stage` a second-stage VAE of `steps` steps over a latent
    map (training/second_stage.py). Mirrored images are added when the checkpoint was trained with
    flips. Unreadable images are reported as `Failed` and left out; the written file is reported as
    `Written` with the fit's summary. Returns the path written and the fit.
    """
    from ..runtime import resolve_device, resolve_precision
    from .second_stage import STEPS, fit_second_stage

    path = ckpt.resolve_checkpoint(checkpoint)
    target = Path(output) if output is not None else path
    if output is not None and target.exists() and not force and target.resolve() != path.resolve():
        raise OutputError(f"{target} already exists; pass --force to overwrite it")
    where = resolve_device(device)
    loaded = ckpt.load_model(path, device=where)
    level, size = model_prior_level(loaded.model), loaded.config.image_size
    if second_stage and len(loaded.model.latent_shapes(size, size)[level]) != 3:
        raise ConfigError(f"a second-stage prior is for latent maps; this {loaded.config.kind} model's latent {level} "
                          f"is a vector, which the mixture (without --second-stage) models")
    found = find_images(list(data), callback=callback)
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, data))}; give the images the model was trained on")
    callback(Started("fit-prior", len(found), "images", {"level": level, "device": str(where)}))
    batches = _counted(iter_batches(found, image_size=size, channels=loaded.config.channels, batch_size=batch_size,
                                    workers=workers, callback=callback), len(found), callback)
    flip = bool(loaded.train_config and loaded.train_config.augment_flip)
    latents = posterior_means(loaded.model, batches, level=level, device=where, flip=flip)
    if second_stage:
        fit = fit_second_stage(latents, level=level, steps=steps or STEPS, seed=seed, device=where,
                               amp=resolve_precision("auto", where, training=True), emit=callback)
    else:
        fit = fit_prior(latents, level=level, components=components, seed=seed)
        callback(Note(fit.message()))
    written = ckpt.save_prior(path, fit.prior, output=target, force=True)
    callback(Written(str(written), extra={"prior": fit.describe()}))
    return written, fit


def _counted(batches: Iterable[tuple], total: int, callback: Callback) -> Iterable[torch.Tensor]:
    """The uint8 tensors of `iter_batches`, with a Progress event after each."""
    done = 0
    for items, pixels, failures in batches:
        done += len(items) + len(failures)
        callback(Progress(done, total))
        yield pixels
