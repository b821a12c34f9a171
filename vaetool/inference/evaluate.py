"""Model quality on a folder: -ELBO, importance-weighted -log p(x), bits/dim, PSNR, SSIM and active units."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..errors import ConfigError, DataError
from ..events import Callback, Progress, Started, Warning, ignore
from ..io.batches import iter_batches
from ..io.decode import to_float
from ..io.find import find_images
from ..models.base import FactorizedPosterior, VAEFamily
from .folder import Outcome
from .load import load_for_inference, model_device

IW_IMAGES_PER_PASS = 256  # images per decoder pass for the importance samples: bounds memory
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015: a unit is active when Cov_x(E_q[z_d]) > 0.01
LN2, LN256 = math.log(2.0), math.log(256.0)
BPD_CONVENTION = {
    "continuous": "8-bit data, uniform dequantization: x in [0, 1] is rescaled to [0, 256), so "
                  "bits/dim = (-log p(x) + D ln 256) / (D ln 2), the density taken at x = k/255",
    "bernoulli": "binary data: bits/dim = -log p(x) / (D ln 2), no dequantization term",
}


@dataclass
class EvalResult:
    """Averages over the evaluated images; nats are per image (summed over pixels, not averaged)."""

    images: int
    neg_elbo: float  # -ELBO = recon + kl
    recon: float  # E_q[-log p(x|z)], estimated with the importance samples
    kl: float  # KL(q(z|x) || N(0, I)), closed form
    iwae_nll: float  # -IWAE_K bound: an upper bound on -log p(x) that tightens as K grows
    iwae_nll_sem: float  # standard error of iwae_nll's mean over images
    iw_samples: int
    bits_per_dim: float  # from iwae_nll
    elbo_bits_per_dim: float  # from neg_elbo
    mse: float  # of posterior-mean reconstructions, pixels in [0, 1]
    psnr: float  # dB, per image then averaged
    ssim: float  # Wang et al. 2004, per image then averaged
    active_units: int
    latent_dim: int
    likelihood: str
    dims: int  # C * H * W
    decoder_scale: float | None  # the Gaussian std / Laplace scale used, None for Bernoulli
    bits_per_dim_convention: str
    seed: int
    checkpoint: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values, failures as {"path", "reason"}."""
        data = asdict(self)
        data["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return data


# ------------------------------------------------------------------------------ pure functions


def bits_per_dim(nll_nats: float | torch.Tensor, dims: int, likelihood: str) -> float | torch.Tensor:
    """Convert -log p(x) in nats per image to bits per dimension.

    Continuous likelihoods (Gaussian, Laplace) give a density on [0, 1]^D; with uniform
    dequantization of 8-bit data, x = (k + u) / 256, the density on [0, 256)^D is p / 256^D, so
    -log P(k) <= -log p_[0,1](x) + D ln 256 (Theis et al. 2016). Bernoulli is already a probability.
    """
    offset = 0.0 if likelihood == "bernoulli" else dims * LN256
    return (nll_nats + offset) / (dims * LN2)


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, (B,) dB, for (B, C, H, W) images; capped at 100 dB."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10 * data_range**2))


def _gaussian_window(size: int, sigma: float, *, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    weights = torch.exp(-coords.pow(2) / (2.0 * sigma**2))
    return weights / weights.sum()  # (size,)


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, (B,), averaged over channels and window positions.

    Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5), weighted (not Bessel-corrected)
    moments, valid positions only. Images smaller than the window use the largest odd window that fits.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    n, c, h, w = a.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd, so the window has a centre
    g = _gaussian_window(size, sigma, device=a.device)
    x, y = a.double().reshape(n * c, 1, h, w), b.double().reshape(n * c, 1, h, w)
    stack = torch.cat([x, y, x * x, y * y, x * y])  # (5 N C, 1, H, W)
    # Separable Gaussian: rows then columns. float64, because var = E[x^2] - mu^2 cancels.
    moments = F.conv2d(F.conv2d(stack, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)  # (N C, 1, H', W') each
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, c, -1).mean(dim=(1, 2))  # (B,)


def active_units(mus: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Latent units whose posterior mean varies over the data: Var_x(E_q[z_d]) > threshold (Burda et al. 2015)."""
    return int((mus.double().var(dim=0, unbiased=False) > threshold).sum())


def _log_weights(model: VAEFamily, x: torch.Tensor, k: int, *, generator: torch.Generator | None,
                 chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, FactorizedPosterior]:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) and log p(x|z_k), both (K, B) float64."""
    posterior = model.encode(x)  # one diagonal Gaussian per level, each (B, ...)
    batch = x.shape[0]
    chunk = max(1, min(k, chunk or max(1, IW_IMAGES_PER_PASS // batch)))
    # All noise drawn up front (K x B x latent is small beside the images), so chunking never changes the result.
    noise = {name: torch.randn((k, *q.mu.shape), generator=generator, device=x.device)
             for name, q in posterior.levels.items()}  # level -> (K, B, ...)
    log_w = torch.empty(k, batch, dtype=torch.float64, device=x.device)
    log_lik = torch.empty_like(log_w)
    for start in range(0, k, chunk):
        z = posterior.sample(noise={name: n[start: start + chunk] for name, n in noise.items()})  # (c, B, ...)
        c = next(iter(z.values())).shape[0]
        logits = model.decode({name: v.reshape(c * batch, *v.shape[2:]) for name, v in z.items()})  # (c B, C, H, W)
        target = x.unsqueeze(0).expand(c, *x.shape).reshape(c * batch, *x.shape[1:])
        ll = model.log_likelihood(target, logits).view(c, batch).double()
        log_lik[start: start + c] = ll
        log_w[start: start + c] = ll + posterior.prior_log_prob(z).double() - posterior.log_prob(z).double()
    return log_w, log_lik, posterior


@torch.inference_mode()
def iwae_bound(model: VAEFamily, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
               chunk: int | None = None) -> torch.Tensor:
    """The importance-weighted lower bound on log p(x), (B,) float64 nats (Burda et al. 2015).

    log p(x) >= E[logsumexp_k log w_k - log K], z_k ~ q(z|x); K = 1 is the ELBO and the bound
    tightens as K grows. `chunk` importance samples are decoded per pass (memory stays bounded).
    """
    if k < 1:
        raise ConfigError(f"the number of importance samples must be >= 1, not {k}")
    was_training = model.training
    model.eval()  # the decoder scale at evaluation is the stored one, never a batch statistic
    try:
        log_w, _, _ = _log_weights(model, x, k, generator=generator, chunk=chunk)
    finally:
        model.train(was_training)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


# ---------------------------------------------------------------------------- the engine


class _Moments:
    """Streaming per-dimension mean and variance in float64 (Chan et al. 1979), for active units."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, values: torch.Tensor) -> None:
        """Fold in a batch of rows (B, D)."""
        values = values.detach().double().cpu()  # (B, D)
        n, mean = values.shape[0], values.mean(0)
        m2 = (values - mean).pow(2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta.pow(2) * self.count * n / total
        self.count = total

    def variance(self) -> torch.Tensor:
        """Per-dimension population variance (D,) of the rows so far."""
        return self.m2 / max(self.count, 1)


class _Sums:
    """Per-image quantities summed in float64."""

    KEYS = ("recon", "kl", "iwae", "iwae_sq", "mse", "psnr", "ssim")

    def __init__(self) -> None:
        self.values = dict.fromkeys(self.KEYS, 0.0)
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
                    moments: _Moments) -> None:
    log_w, log_lik, posterior = _log_weights(model, x, k, generator=generator, chunk=None)
    iwae = -(torch.logsumexp(log_w, dim=0) - math.log(k))  # (B,)
    recon = model.mean_image(model.decode(posterior.mode()))  # (B, C, H, W)
    mse = (recon.double() - x.double()).pow(2).flatten(1).mean(1)
    sums.add(recon=-log_lik.mean(0), kl=posterior.kl(), iwae=iwae, iwae_sq=iwae.pow(2), mse=mse,
             psnr=psnr(recon, x), ssim=ssim(recon, x))
    moments.update(posterior.mu)


def evaluate(checkpoint_or_model: VAEFamily | Checkpoint | str | Path, data: Sequence[str | Path] | torch.Tensor, *,
             iw_samples: int = 100, batch_size: int = 32, seed: int = 0, device: str = "auto",
             workers: int | None = None, callback: Callback = ignore) -> EvalResult:
    """Evaluate a model on image files/folders (or a (N, C, H, W) uint8 or [0, 1] float tensor).

    The same seed and batch size give the same numbers. Unreadable files are left out, reported as
    `Failed` and listed in `failures`; progress is `Started`, `Progress` and `Warning` events.
    """
    if iw_samples < 1 or batch_size < 1:
        raise ConfigError("--iw-samples and --batch-size must be >= 1")
    given = checkpoint_or_model.model if isinstance(checkpoint_or_model, Checkpoint) else checkpoint_or_model
    was_training = bool(getattr(given, "training", False))
    loaded = load_for_inference(checkpoint_or_model, device=device, command="eval")
    model, dev = loaded.model, model_device(loaded)
    source = str(loaded.path) if loaded.path else None
    outcome = Outcome()
    callback = outcome.recorder(callback)
    generator = torch.Generator(device=dev).manual_seed(seed)
    sums, moments, failed, binary = _Sums(), _Moments(), 0, True
    if isinstance(data, torch.Tensor):
        callback(Started("eval", int(data.shape[0])))
        batches = _tensor_batches(data, model, batch_size)
    else:
        batches = _file_batches(data, model, batch_size, callback, workers)
    try:
        for batch, failures in batches:
            failed += failures
            if batch.shape[0]:
                x = _as_float(batch, dev)  # (B, C, H, W) in [0, 1]
                binary = binary and bool(((x == 0) | (x == 1)).all())
                _evaluate_batch(model, x, iw_samples, generator, sums, moments)
            callback(Progress(sums.count + failed, None))
    finally:
        model.train(was_training)
    if sums.count == 0:
        raise DataError(f"none of the {len(outcome.failed)} input images could be read; nothing to evaluate")
    return _result(model, sums, moments, iw_samples, seed, source, outcome.failed, binary, callback)


def _result(model: VAEFamily, sums: _Sums, moments: _Moments, k: int, seed: int, source: str | None,
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
    return EvalResult(
        images=n, neg_elbo=recon + kl, recon=recon, kl=kl, iwae_nll=nll, iwae_nll_sem=math.sqrt(spread / n),
        iw_samples=k, bits_per_dim=float(bits_per_dim(nll, dims, cfg.likelihood)),
        elbo_bits_per_dim=float(bits_per_dim(recon + kl, dims, cfg.likelihood)), mse=sums.mean("mse"),
        psnr=sums.mean("psnr"), ssim=sums.mean("ssim"), active_units=int((moments.variance() > ACTIVE_THRESHOLD).sum()),
        latent_dim=cfg.latent_dim, likelihood=cfg.likelihood, dims=dims, decoder_scale=scale,
        bits_per_dim_convention=BPD_CONVENTION["bernoulli" if cfg.likelihood == "bernoulli" else "continuous"],
        seed=seed, checkpoint=source, failures=failures, warnings=warnings)
