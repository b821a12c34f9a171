"""Model quality on a folder, for every model family: -ELBO with each level's KL, importance-weighted -log p(x),
bits/dim, PSNR, SSIM, active units, and (with `samples`) how well prior samples pass for the images."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import ConfigError, DataError
from ..events import Callback, Progress, Started, Warning, ignore
from ..io.batches import iter_batches
from ..io.decode import to_float
from ..io.find import find_images
from ..models.base import FactorizedPosterior, Latents, Posterior, VAEFamily
from .folder import Outcome
from .load import load_for_inference, model_device
from .metrics import ACTIVE_THRESHOLD, BPD_CONVENTION, LN2, LN256, Moments, active_units, bits_per_dim, psnr, ssim

__all__ = ["ACTIVE_THRESHOLD", "BPD_CONVENTION", "LN2", "LN256", "EvalResult", "active_units", "bits_per_dim",
           "draw_noise", "evaluate", "iwae_bound", "psnr", "ssim"]

_Moments = Moments  # the name the tests and older callers use
IW_IMAGES_PER_PASS = 256  # images per decoder pass for the importance samples: bounds memory
ALL_LEVELS = "all levels"


@dataclass
class EvalResult:
    """Averages over the evaluated images; nats are per image (summed over pixels, not averaged)."""

    images: int
    neg_elbo: float  # -ELBO = recon + kl
    recon: float  # E_q[-log p(x|z)], estimated with the importance samples
    kl: float  # sum of the levels' KL(q || p); below a hierarchy's top, given the levels above drawn once
    iwae_nll: float  # -IWAE_K bound: an upper bound on -log p(x) that tightens as K grows
    iwae_nll_sem: float  # standard error of iwae_nll's mean over images
    iw_samples: int
    bits_per_dim: float  # from iwae_nll
    elbo_bits_per_dim: float  # from neg_elbo
    mse: float  # of posterior-mean reconstructions, pixels in [0, 1]
    psnr: float  # dB, per image then averaged
    ssim: float  # Wang et al. 2004, per image then averaged
    active_units: int  # of the level `active_units_of` (the vector level, else every level's elements)
    latent_dim: int  # the units `active_units` counts among
    likelihood: str
    dims: int  # C * H * W
    decoder_scale: float | None  # the Gaussian std / Laplace scale used, None for Bernoulli
    bits_per_dim_convention: str
    seed: int
    checkpoint: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[str] = field(default_factory=list)
    family: str = "vector"
    active_units_of: str = "z"
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)  # level -> shape, kl, active_units, units
    samples: dict[str, Any] | None = None  # the sample metric (sample_metric.SampleReport.to_dict()), if asked

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values, failures as {"path", "reason"}."""
        data = asdict(self)
        data["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return data


# ------------------------------------------------------------------------------ the IWAE bound


def draw_noise(shapes: dict[str, tuple[int, ...]], k: int, batch: int,
               generator: torch.Generator | None) -> Latents:
    """level -> (K, B, *shape) standard normal noise on the CPU, drawn image by image, then level by level.

    Image i of a folder gets the same draws whatever batch it falls in, so a seed fixes the numbers
    whatever the batch size (and on any device).
    """
    per_image = [{name: torch.randn((k, *shape), generator=generator) for name, shape in shapes.items()}
                 for _ in range(batch)]
    return {name: torch.stack([draws[name] for draws in per_image], dim=1) for name in shapes}


def _log_weights(model: VAEFamily, x: torch.Tensor, k: int, *, generator: torch.Generator | None,
                 chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, Posterior, Latents]:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) and log p(x|z_k), both (K, B) float64.

    `model.importance_sample` draws every level of the family (a hierarchy's conditionally, top-down).
    """
    posterior = model.encode(x)
    batch = x.shape[0]
    chunk = max(1, min(k, chunk or max(1, IW_IMAGES_PER_PASS // batch)))
    # All noise drawn up front (K x B x latent is small beside the images), so chunking never changes the result.
    shapes = model.latent_shapes(*x.shape[-2:])
    noise = {name: value.to(x.device) for name, value in draw_noise(shapes, k, batch, generator).items()}
    log_w = torch.empty(k, batch, dtype=torch.float64, device=x.device)
    log_lik = torch.empty_like(log_w)
    for start in range(0, k, chunk):
        drawn = model.importance_sample(posterior, {name: n[start: start + chunk] for name, n in noise.items()})
        c = drawn.log_q.shape[0]
        target = x.unsqueeze(0).expand(c, *x.shape).reshape(c * batch, *x.shape[1:])
        ll = model.log_likelihood(target, drawn.logits).view(c, batch).double()
        log_lik[start: start + c] = ll
        log_w[start: start + c] = ll + drawn.log_p.double() - drawn.log_q.double()
    return log_w, log_lik, posterior, noise


@torch.inference_mode()
def iwae_bound(model: VAEFamily, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
               chunk: int | None = None) -> torch.Tensor:
    """The importance-weighted lower bound on log p(x), (B,) float64 nats (Burda et al. 2015).

    log p(x) >= E[logsumexp_k log w_k - log K], z_k ~ q(z|x); K = 1 is the ELBO and the bound
    tightens as K grows. `chunk` importance samples are decoded per pass (memory stays bounded).
    `generator` is a CPU generator; the noise comes from it image by image (`draw_noise`).
    """
    if k < 1:
        raise ConfigError(f"the number of importance samples must be >= 1, not {k}")
    was_training = model.training
    model.eval()  # the decoder scale at evaluation is the stored one, never a batch statistic
    try:
        log_w, _, _, _ = _log_weights(model, x, k, generator=generator, chunk=chunk)
    finally:
        model.train(was_training)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def level_kl(model: VAEFamily, x: torch.Tensor, posterior: Posterior, noise: Latents) -> dict[str, torch.Tensor]:
    """Level -> (B,) KL(q || p) in nats per image.

    Closed form for a factorized posterior. In a hierarchy each level's KL to its conditional prior is
    closed form given the levels above, which are drawn once per image (the first importance sample's
    noise): the estimate the ELBO is trained with.
    """
    if isinstance(posterior, FactorizedPosterior):
        return {name: kl.flatten(1).sum(1) for name, kl in posterior.kl_terms().items()}
    return model(x, sample=True, noise={name: value[0] for name, value in noise.items()}).kl_per_level()


# ---------------------------------------------------------------------------- the engine


class _Sums:
    """Per-image quantities summed in float64; any key (the levels' KL among them)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)
        self.count = 0

    def add(self, **per_image: torch.Tensor) -> None:
        """Add each quantity's (B,) per-image values."""
        for key, value in per_image.items():
            self.values[key] += float(value.double().sum())
        self.count += int(next(iter(per_image.values())).shape[0])

    def mean(self, key: str) -> float:
        """The mean of a quantity over the images added."""
        return self.values[key] / max(self.count, 1)


def _tensor_batches(data: torch.Tensor, model: VAEFamily, batch_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    cfg = model.config
    expected = (cfg.channels, cfg.image_size, cfg.image_size)
    if data.ndim != 4 or tuple(data.shape[1:]) != expected:
        raise DataError(f"images must be a (N, {', '.join(map(str, expected))}) tensor for this model, "
                        f"got {tuple(data.shape)}")
    for start in range(0, data.shape[0], batch_size):
        yield data[start: start + batch_size], 0


def _file_batches(data: Sequence[str | Path], model: VAEFamily, batch_size: int, callback: Callback,
                  workers: int | None) -> Iterator[tuple[torch.Tensor, int]]:
    found = find_images(data, callback=callback)
    callback(Started("eval", len(found)))
    cfg = model.config
    for _, batch, failures in iter_batches(found, image_size=cfg.image_size, channels=cfg.channels,
                                           batch_size=batch_size, workers=workers, callback=callback):
        yield batch, len(failures)


def _as_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if batch.dtype == torch.uint8:
        return to_float(batch, device)
    x = batch.to(device, torch.float32)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise DataError("float images must lie in [0, 1]; pass uint8 images or scale them")
    return x


@torch.inference_mode()
def _evaluate_batch(model: VAEFamily, x: torch.Tensor, k: int, generator: torch.Generator, sums: _Sums,
                    moments: dict[str, Moments]) -> None:
    log_w, log_lik, posterior, noise = _log_weights(model, x, k, generator=generator, chunk=None)
    iwae = -(torch.logsumexp(log_w, dim=0) - math.log(k))  # (B,)
    means = posterior.mode()  # level -> (B, ...): in a hierarchy each level's mean given the means above
    recon = model.mean_image(model.decode(means))  # (B, C, H, W)
    mse = (recon.double() - x.double()).pow(2).flatten(1).mean(1)
    kls = level_kl(model, x, posterior, noise)
    kl = sum(value.double() for value in kls.values())  # (B,)
    sums.add(recon=-log_lik.mean(0), kl=kl, iwae=iwae, iwae_sq=iwae.pow(2), mse=mse, psnr=psnr(recon, x),
             ssim=ssim(recon, x), **{f"kl_{name}": value for name, value in kls.items()})
    for name, value in means.items():
        moments.setdefault(name, Moments()).update(value.flatten(1))  # (B, elements of the level)


def evaluate(checkpoint_or_model: VAEFamily | Checkpoint | str | Path, data: Sequence[str | Path] | torch.Tensor, *,
             iw_samples: int = 100, batch_size: int = 32, seed: int = 0, device: str = "auto",
             workers: int | None = None, samples: int = 0, train_data: Sequence[str | Path] | None = None,
             sample_temperature: float | dict[str, float] = 1.0, sample_prior: str = "auto",
             sample_repeats: int | None = None, callback: Callback = ignore) -> EvalResult:
    """Evaluate a model of any family on image files/folders (or a (N, C, H, W) uint8 or [0, 1] float tensor).

    The same seed gives the same numbers, whatever the batch size. Unreadable files are left out,
    reported as `Failed` and listed in `failures`; progress is `Started`, `Progress` and `Warning` events.
    With `samples` N > 0, N prior samples are scored against the evaluated images (`sample_metric`),
    their nearest-image distances against `train_data` when given; they are drawn as `vaetool sample` draws
    them, at `sample_temperature` (one value, or per level) from `sample_prior` ("auto", "fitted", "standard");
    `sample_repeats` cross-fitted splits of the two-sample test are averaged (None: `sample_metric.REPEATS`).
    """
    if iw_samples < 1 or batch_size < 1:
        raise ConfigError("--iw-samples and --batch-size must be >= 1")
    if samples < 0 or samples == 1:  # before the evaluation, not after it
        raise ConfigError(f"the sample metric needs at least 2 samples, not {samples}; give --samples 2 or more")
    if sample_repeats is not None and sample_repeats < 1:
        raise ConfigError(f"--c2st-repeats must be 1 or more, not {sample_repeats}")
    given = checkpoint_or_model.model if isinstance(checkpoint_or_model, Checkpoint) else checkpoint_or_model
    was_training = bool(getattr(given, "training", False))
    loaded = load_for_inference(checkpoint_or_model, device=device)
    model, dev = loaded.model, model_device(loaded)
    outcome = Outcome()
    callback = outcome.recorder(callback)
    generator = torch.Generator().manual_seed(seed)  # CPU: the same draws on any device
    sums, moments, state = _Sums(), {}, {"failed": 0, "binary": True}
    kept: list[torch.Tensor] | None = [] if samples else None  # the real images, for the sample metric
    try:
        for x in _float_batches(data, model, batch_size, dev, workers, callback, state, sums):
            _evaluate_batch(model, x, iw_samples, generator, sums, moments)
            if kept is not None:
                kept.append((x * 255.0).round().to(torch.uint8).cpu())
            callback(Progress(sums.count + state["failed"], None))
        if sums.count == 0:
            raise DataError(f"none of the {len(outcome.failed)} input images could be read; nothing to evaluate")
        result = _result(model, sums, moments, iw_samples, seed, str(loaded.path) if loaded.path else None,
                         outcome.failed, state["binary"], callback)
        if samples:  # still in eval mode: the decoder scale is the stored one
            from .sample_metric import sample_report

            result.samples = sample_report(loaded, torch.cat(kept), samples, seed=seed, train_data=train_data,
                                           temperature=sample_temperature, prior=sample_prior,
                                           batch_size=batch_size, workers=workers, callback=callback,
                                           test_options=None if sample_repeats is None else
                                           {"repeats": sample_repeats}).to_dict()
    finally:
        model.train(was_training)
    return result


def _float_batches(data: Sequence[str | Path] | torch.Tensor, model: VAEFamily, batch_size: int, dev: torch.device,
                   workers: int | None, callback: Callback, state: dict[str, Any],
                   sums: _Sums) -> Iterator[torch.Tensor]:
    """(B, C, H, W) float images in [0, 1] on `dev`; counts failures and whether every pixel is 0 or 1 in `state`."""
    if isinstance(data, torch.Tensor):
        callback(Started("eval", int(data.shape[0])))
        batches = _tensor_batches(data, model, batch_size)
    else:
        batches = _file_batches(data, model, batch_size, callback, workers)
    for batch, failures in batches:
        state["failed"] += failures
        if batch.shape[0]:
            x = _as_float(batch, dev)
            state["binary"] = state["binary"] and bool(((x == 0) | (x == 1)).all())
            yield x
        elif failures:
            callback(Progress(sums.count + state["failed"], None))


def _levels(model: VAEFamily, sums: _Sums, moments: dict[str, Moments]) -> dict[str, dict[str, Any]]:
    cfg = model.config
    shapes = model.latent_shapes(cfg.image_size, cfg.image_size)
    return {name: {"shape": list(shape), "kl": sums.mean(f"kl_{name}"),
                   "active_units": int((moments[name].variance() > ACTIVE_THRESHOLD).sum()),
                   "units": math.prod(shape)} for name, shape in shapes.items()}


def _result(model: VAEFamily, sums: _Sums, moments: dict[str, Moments], k: int, seed: int, source: str | None,
            failures: list, binary: bool, callback: Callback) -> EvalResult:
    cfg = model.config
    dims = cfg.channels * cfg.image_size**2
    n = sums.count
    recon, kl, nll = sums.mean("recon"), sums.mean("kl"), sums.mean("iwae")
    spread = max(sums.mean("iwae_sq") - nll**2, 0.0) * n / max(n - 1, 1)
    warnings = []
    if cfg.likelihood == "bernoulli" and not binary:
        warnings.append("Bernoulli likelihood on non-binary pixels: -log p(x) is a cross-entropy, "
                        "not a log-likelihood; binarize the data for a meaningful NLL")
    for message in warnings:
        callback(Warning(message))
    log_scale = model.log_scale.detach().clamp_min(cfg.min_log_scale)
    scale = None if cfg.likelihood == "bernoulli" else float(log_scale.exp())
    levels = _levels(model, sums, moments)
    counted = model.vector_level if model.vector_level in levels else None
    active = levels[counted]["active_units"] if counted else sum(v["active_units"] for v in levels.values())
    units = levels[counted]["units"] if counted else sum(v["units"] for v in levels.values())
    return EvalResult(
        images=n, neg_elbo=recon + kl, recon=recon, kl=kl, iwae_nll=nll, iwae_nll_sem=math.sqrt(spread / n),
        iw_samples=k, bits_per_dim=float(bits_per_dim(nll, dims, cfg.likelihood)),
        elbo_bits_per_dim=float(bits_per_dim(recon + kl, dims, cfg.likelihood)), mse=sums.mean("mse"),
        psnr=sums.mean("psnr"), ssim=sums.mean("ssim"), active_units=active, latent_dim=units,
        likelihood=cfg.likelihood, dims=dims, decoder_scale=scale,
        bits_per_dim_convention=BPD_CONVENTION["bernoulli" if cfg.likelihood == "bernoulli" else "continuous"],
        seed=seed, checkpoint=source, failures=failures, warnings=warnings, family=cfg.kind,
        active_units_of=counted or ALL_LEVELS, levels=levels)
