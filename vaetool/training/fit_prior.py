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

import torch

from .. import checkpoint as ckpt
from ..errors import ConfigError, DataError, OutputError
from ..events import Callback, Note, Progress, Started, Written, ignore
from ..io.batches import iter_batches
from ..io.decode import to_float
from ..io.find import find_images
from ..models.base import VAEFamily
from ..models.prior import FittedPrior, prior_level, select_mixture

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


def fit_run_priors(run_dir: Path, pixels: torch.Tensor, index: torch.Tensor, *, batch: int, seed: int,
                   device: torch.device, flip: bool, emit: Callback = ignore) -> PriorFit | None:
    """Fit a prior for each checkpoint of a run (model and last) on the training images and store it in the file.

    `pixels` is the uint8 image cache (N, C, H, W) and `index` the training rows. Checkpoints with the
    same weights share one fit. Returns model.safetensors' fit (None when there are too few images).
    """
    fits: dict[str, PriorFit] = {}
    result = None
    for name in (ckpt.MODEL_FILE, ckpt.LAST_FILE):
        path = run_dir / name
        if not path.exists():
            continue
        loaded = ckpt.load_model(path, device=device)
        level = model_prior_level(loaded.model)
        size = loaded.config.image_size
        numbers = math.prod(loaded.model.latent_shapes(size, size)[level])
        if loaded.model.vector_level is None and numbers > MAX_MAP_NUMBERS:
            emit(Note(f"no prior fitted at the end of training: the latent map has {numbers} numbers per image "
                      f"(above {MAX_MAP_NUMBERS}); `vaetool fit-prior` fits one"))
            return None
        fit = fits.get(loaded.identity)
        if fit is None:
            batches = (pixels[index[start: start + batch]] for start in range(0, len(index), batch))
            latents = posterior_means(loaded.model, batches, level=level, device=device, flip=flip)
            if len(latents) < MIN_LATENTS:
                emit(Note(f"no prior fitted: {len(latents)} training images are too few (at least {MIN_LATENTS})"))
                return None
            fit = fits[loaded.identity] = fit_prior(latents, level=level, seed=seed)
            emit(Note(fit.message()))
        ckpt.save_prior(path, fit.prior)
        result = result or fit
    return result


# ------------------------------------------------------------------------------ for a checkpoint made before


def fit_checkpoint_prior(checkpoint: str | os.PathLike, data: Sequence[str | os.PathLike], *,
                         components: int | None = None, seed: int = 0, output: str | os.PathLike | None = None,
                         force: bool = False, batch_size: int = 64, device: str = "auto", workers: int | None = None,
                         callback: Callback = ignore) -> tuple[Path, PriorFit]:
    """Fit a prior to the posterior means of the images under `data` and store it in `checkpoint` (or `output`).

    Mirrored images are added when the checkpoint was trained with flips. Unreadable images are
    reported as `Failed` and left out; the written file is reported as `Written` with the fit's
    summary. Returns the path written and the fit.
    """
    from ..runtime import resolve_device

    path = ckpt.resolve_checkpoint(checkpoint)
    target = Path(output) if output is not None else path
    if output is not None and target.exists() and not force and target.resolve() != path.resolve():
        raise OutputError(f"{target} already exists; pass --force to overwrite it")
    where = resolve_device(device)
    loaded = ckpt.load_model(path, device=where)
    level, size = model_prior_level(loaded.model), loaded.config.image_size
    found = find_images(list(data), callback=callback)
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, data))}; give the images the model was trained on")
    callback(Started("fit-prior", len(found), "images", {"level": level, "device": str(where)}))
    batches = _counted(iter_batches(found, image_size=size, channels=loaded.config.channels, batch_size=batch_size,
                                    workers=workers, callback=callback), len(found), callback)
    flip = bool(loaded.train_config and loaded.train_config.augment_flip)
    latents = posterior_means(loaded.model, batches, level=level, device=where, flip=flip)
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
