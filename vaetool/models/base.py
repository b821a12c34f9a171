"""The interface every model family implements, the diagonal Gaussian posterior, and the family registry.

A family maps images to a posterior over its latents and latents back to decoder logits. Latents are
a dict of named levels, each (B, ...), in top-down order: `{"z": (B, D)}` for the vector family,
`{"z": (B, C, h, w)}` for the spatial one, `{"top": (B, D), "z16": (B, C, H/16, W/16), ..., "z4": ...}`
for the hierarchy. Every family also draws latents from its prior and returns the KL of each level for
the ELBO.

What the other layers call, for every family:

- `model.latent_shapes(H, W)`: level -> shape without the batch; the trainer draws the
  reparameterization noise `{level: randn(B, *shape)}` itself and passes it as `forward(x, noise=...)`,
  so DDP and resume stay exact.
- `model(x, sample=, noise=, generator=)` -> `ModelOutput` (latents, logits, kl_terms per level, posterior);
  `elbo_loss(model, x, output)` -> `LossTerms`.
- `model.encode(x)` -> `Posterior`: `sample(generator, noise=, temperature=)`, `mode()` (the means, level
  by level), `log_prob(latents)` = log q(z|x) and `prior_log_prob(latents)` = log p(z), both (..., B).
- `model.decode(latents)` -> logits; `model.mean_image(logits)` -> pixels; `model.reconstruct(x)`.
- `model.importance_sample(posterior, noise)` with noise (K, B, ...) per level -> `ImportanceSample`
  (latents, logits (K B, C, H, W), log q (K, B), log p (K, B)): the IWAE bound's terms in one pass.
- `model.sample_prior(count, temperature=float | {level: float}, generator=, size=(H, W), given=, noise=)` -> latents;
  levels in `given` are kept (a hierarchy draws the levels below from their conditional priors given them).
- `model.size_multiple` (None: only the config's image size; else the sides must be multiples of it),
  `model.check_size(H, W)`, `model.vector_level` (the level that is one vector per image, or None).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, DataError
from .likelihoods import Likelihood

# A posterior variance above the prior's (logvar > 0) never helps the ELBO, so the top of the range is 2
# (KL <= 2.2 nats per element): with 20, one run of Adam steps on the wide logvar head reached e^20 and a
# KL of 1e8 nats per image. The bottom keeps exp(logvar) finite in float32 and bf16.
LOGVAR_RANGE = (-30.0, 2.0)
LOG_2PI = math.log(2 * math.pi)

Latents = dict[str, torch.Tensor]  # level name -> (B, ...) latent values
Reduce = Callable[[torch.Tensor], torch.Tensor]  # a mean over processes, passed in by the trainer


def _sum_event(values: torch.Tensor, event_dims: int) -> torch.Tensor:
    return values.flatten(values.ndim - event_dims).sum(-1) if event_dims else values


class DiagonalGaussian:
    """N(mu, diag(exp(logvar))) over a latent of any shape (B, ...): a posterior or a conditional prior."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu = mu  # (B, ...)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)  # (B, ...)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def event_dims(self) -> int:
        return self.mu.ndim - 1

    def sample(self, generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Draw z = mu + T * std * eps (the reparameterization trick, Kingma & Welling 2014)."""
        if noise is None:
            noise = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu + (temperature * self.std) * noise.to(self.mu.dtype)

    def mode(self) -> torch.Tensor:
        return self.mu

    def kl_per_dim(self, prior: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || prior) per latent element, (B, ...), in closed form; the prior defaults to N(0, I)."""
        if prior is None:
            return 0.5 * (self.mu.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        # expm1(d) - d, not exp(d) - 1 - d: a posterior close to its prior (d near 0) is the common case in
        # a hierarchy, and there the plain form loses most of its float32 digits.
        log_ratio = self.logvar - prior.logvar
        return 0.5 * (torch.expm1(log_ratio) - log_ratio + (self.mu - prior.mu).pow(2) * (-prior.logvar).exp())

    def kl(self, prior: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || prior) summed over the latent, (B,) nats."""
        return _sum_event(self.kl_per_dim(prior), self.event_dims)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log density of z (..., B, *event), summed over the event dimensions."""
        per = -0.5 * (((z - self.mu) ** 2) / self.logvar.exp() + self.logvar + LOG_2PI)
        return _sum_event(per, self.event_dims)


def standard_normal_log_prob(z: torch.Tensor, event_dims: int = 1) -> torch.Tensor:
    """log N(z; 0, I) summed over the last `event_dims` dimensions."""
    return _sum_event(-0.5 * (z.pow(2) + LOG_2PI), event_dims)


class Posterior(ABC):
    """q(z|x) over every level of a family's latents.

    Noise and latents may carry leading sample dimensions, (K, B, ...): the IWAE bound draws K at once.
    """

    @abstractmethod
    def sample(self, generator: torch.Generator | None = None, *, noise: Latents | torch.Tensor | None = None,
               temperature: float = 1.0) -> Latents:
        """Latents drawn from q (reparameterized, so gradients flow); `noise` gives each level's eps."""

    @abstractmethod
    def mode(self) -> Latents:
        """The posterior means, level by level (in a hierarchy, each level's mean given the means above)."""

    @abstractmethod
    def log_prob(self, latents: Latents) -> torch.Tensor:
        """log q(z|x) summed over every level and element, (..., B)."""

    @abstractmethod
    def prior_log_prob(self, latents: Latents) -> torch.Tensor:
        """log p(z), the family's prior (conditional level by level in a hierarchy), (..., B)."""


class MainLevelView:
    """`.mu`, `.logvar` and `.std` of the one level that `main_level()` names, for code written for one vector."""

    def main_level(self) -> DiagonalGaussian:
        raise NotImplementedError

    @property
    def mu(self) -> torch.Tensor:
        return self.main_level().mu

    @property
    def logvar(self) -> torch.Tensor:
        return self.main_level().logvar

    @property
    def std(self) -> torch.Tensor:
        return self.main_level().std


class FactorizedPosterior(MainLevelView, Posterior):
    """q(z|x) = prod over levels of independent diagonal Gaussians, each with a N(0, I) prior (vector, spatial).

    With one level (named "z") `.mu`, `.logvar` and `.std` are that level's.
    """

    def __init__(self, levels: dict[str, DiagonalGaussian]) -> None:
        self.levels = levels

    def main_level(self) -> DiagonalGaussian:
        if len(self.levels) != 1:
            raise ValueError("this posterior has several levels; use .levels")
        return next(iter(self.levels.values()))

    def sample(self, generator: torch.Generator | None = None, *, noise: Latents | torch.Tensor | None = None,
               temperature: float = 1.0) -> Latents:
        noise = as_latents(noise, self.levels) if noise is not None else {}
        return {name: q.sample(generator, noise=noise.get(name), temperature=temperature)
                for name, q in self.levels.items()}

    def mode(self) -> Latents:
        return {name: q.mode() for name, q in self.levels.items()}

    def kl_terms(self) -> dict[str, torch.Tensor]:
        """Level -> (B, ...) KL to N(0, I) per latent element."""
        return {name: q.kl_per_dim() for name, q in self.levels.items()}

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over every level, (B,) nats."""
        return sum(q.kl() for q in self.levels.values())

    def log_prob(self, latents: Latents) -> torch.Tensor:
        """log q(z|x) summed over levels; latents may carry leading sample dimensions."""
        return sum(q.log_prob(latents[name]) for name, q in self.levels.items())

    def prior_log_prob(self, latents: Latents) -> torch.Tensor:
        """log N(z; 0, I) summed over levels."""
        return sum(standard_normal_log_prob(latents[name], q.event_dims) for name, q in self.levels.items())


def as_latents(value: Latents | torch.Tensor, like: dict[str, object]) -> Latents:
    """A bare tensor means the only level of a one-level family."""
    if isinstance(value, torch.Tensor):
        if len(like) != 1:
            raise ValueError(f"latents need the levels {', '.join(like)}, not one tensor")
        return {next(iter(like)): value}
    return value


def level_temperatures(temperature: float | dict[str, float], names: list[str]) -> dict[str, float]:
    """One temperature per level: a float for all, or a dict whose missing levels stay at 1."""
    if not isinstance(temperature, dict):
        return dict.fromkeys(names, float(temperature))
    unknown = sorted(set(temperature) - set(names))
    if unknown:
        raise ConfigError(f"no latent level {unknown[0]!r} for --temperature; this model's levels are "
                          f"{', '.join(names)}")
    return {name: float(temperature.get(name, 1.0)) for name in names}


@dataclass
class ImportanceSample:
    """K posterior samples per image with what the importance weights need (Burda et al. 2015)."""

    latents: Latents  # level -> (K, B, ...)
    logits: torch.Tensor  # (K B, C, H, W), sample-major: row k * B + b
    log_q: torch.Tensor  # (K, B) log q(z|x)
    log_p: torch.Tensor  # (K, B) log p(z)


@dataclass
class ModelOutput:
    """One pass through a family: the latents used, the decoder logits and the KL of each level."""

    latents: Latents
    logits: torch.Tensor  # (B, C, H, W)
    kl_terms: dict[str, torch.Tensor]  # level -> (B, ...) KL per latent element, nats
    posterior: Posterior | None = None

    def kl_per_level(self) -> dict[str, torch.Tensor]:
        """Level -> (B,) KL in nats per image."""
        return {name: _sum_event(kl, kl.ndim - 1) for name, kl in self.kl_terms.items()}


class VAEFamily(Likelihood, nn.Module, ABC):
    """A VAE family: images (B, C, H, W) in [0, 1] to a posterior, latents to decoder logits, a prior to sample."""

    kind: str = ""
    vector_level: str | None = None  # the level that is one vector per image (traverse, latent maps), if any

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        Likelihood.__init__(self, config)
        self.config = config

    @property
    def device(self) -> torch.device:
        return self.scale_updates.device

    @property
    def size_multiple(self) -> int | None:
        """None: the model takes only `config.image_size` squares; else any size whose sides are multiples of it."""
        return None

    def check_size(self, height: int, width: int) -> None:
        """Raise DataError, naming the sizes that fit, when an image of this size cannot go through whole."""
        multiple, size = self.size_multiple, self.config.image_size
        if multiple is None and (height, width) != (size, size):
            raise DataError(f"this {self.kind} model takes {size}x{size} images, not {height}x{width}; "
                            f"resize them (or train a spatial or hierarchical model for any size)")
        if multiple is not None and (height % multiple or width % multiple or min(height, width) < multiple):
            raise DataError(f"a {height}x{width} image does not fit this {self.kind} model: its sides must be "
                            f"multiples of {multiple}; pad or crop it to {_round_up(height, multiple)}x"
                            f"{_round_up(width, multiple)}")

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Posterior:
        """q(z|x) for images x (B, C, H, W) in [0, 1]."""

    @abstractmethod
    def decode(self, latents: Latents | torch.Tensor) -> torch.Tensor:
        """Decoder logits (B, C, H, W) for latents; `mean_image` turns them into pixels."""

    @abstractmethod
    def forward(self, x: torch.Tensor, *, sample: bool = True, noise: Latents | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Encode, draw (or take the mode of) the latents, decode; with every level's KL."""

    @abstractmethod
    def latent_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Each level's latent shape (without the batch) for an image of this size."""

    @abstractmethod
    def sample_prior(self, count: int, *, temperature: float | dict[str, float] = 1.0,
                     generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
                     given: Latents | None = None, noise: Latents | None = None) -> Latents:
        """Latents drawn from the prior (ancestrally for a hierarchy), on the model's device.

        The noise comes from `generator` on the CPU, so a seed gives the same latents on any device;
        `size` (H, W) defaults to the config's image size. Levels in `given` (count, ...) are used
        instead of drawn (in a hierarchy the levels below are then drawn given them); `noise` gives
        each drawn level's standard normal eps (count, ...) instead of the generator.
        """

    def importance_sample(self, posterior: Posterior, noise: Latents) -> ImportanceSample:
        """Draw K latents per image from `posterior` with `noise` (level -> (K, B, ...)), decode them, and
        score them under q and the prior: the terms of log w = log p(x|z) + log p(z) - log q(z|x)."""
        latents = posterior.sample(noise=noise)  # level -> (K, B, ...)
        logits = self.decode({name: value.flatten(0, 1) for name, value in latents.items()})  # (K B, C, H, W)
        return ImportanceSample(latents, logits, posterior.log_prob(latents), posterior.prior_log_prob(latents))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior means, (B, C, H, W) in [0, 1]."""
        return self.mean_image(self.decode(self.encode(x).mode()))


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


class FactorizedFamily(VAEFamily):
    """A family whose posterior is a `FactorizedPosterior` and whose prior is N(0, I) on every level."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> FactorizedPosterior:
        """q(z|x) for images x (B, C, H, W) in [0, 1]."""

    def forward(self, x: torch.Tensor, *, sample: bool = True, noise: Latents | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        posterior = self.encode(x)
        latents = posterior.sample(generator, noise=noise) if sample else posterior.mode()
        return ModelOutput(latents, self.decode(latents), posterior.kl_terms(), posterior)

    def sample_prior(self, count: int, *, temperature: float | dict[str, float] = 1.0,
                     generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
                     given: Latents | None = None, noise: Latents | None = None) -> Latents:
        size = size or (self.config.image_size, self.config.image_size)
        shapes = self.latent_shapes(*size)
        temperatures = level_temperatures(temperature, list(shapes))
        given, noise = check_given(given, shapes, count), noise or {}
        latents = {}
        for name, shape in shapes.items():  # the levels are independent: a given one leaves the others as they are
            if name in given:
                latents[name] = given[name].to(self.device)
                continue
            eps = noise[name] if name in noise else torch.randn(count, *shape, generator=generator)
            latents[name] = (temperatures[name] * eps).to(self.device)
        return latents


def check_given(given: Latents | None, shapes: dict[str, tuple[int, ...]], count: int) -> Latents:
    """The levels a caller fixes for `sample_prior`, checked against the model's levels and shapes."""
    given = given or {}
    for name, value in given.items():
        if name not in shapes:
            raise DataError(f"no latent level {name!r} in this model; its levels are {', '.join(shapes)}")
        if tuple(value.shape) != (count, *shapes[name]):
            raise DataError(f"latent level {name!r} has shape {tuple(value.shape)}; this model needs "
                            f"{(count, *shapes[name])}")
    return given


FAMILIES: dict[str, type[VAEFamily]] = {}


def register(cls: type[VAEFamily]) -> type[VAEFamily]:
    """Class decorator: make a family buildable from a config whose `kind` is `cls.kind`."""
    FAMILIES[cls.kind] = cls
    return cls


def build_model(config: ModelConfig) -> VAEFamily:
    """The model of the family the config names, freshly initialised."""
    from . import hierarchical, spatial, vector  # noqa: F401  (registers the built-in families)

    try:
        family = FAMILIES[config.kind]
    except KeyError:
        raise ConfigError(f"unknown model kind {config.kind!r}; use one of {', '.join(sorted(FAMILIES))}") from None
    return family(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: what the optimiser minimises (mean over the batch)
    recon: torch.Tensor  # (B,) -log p(x|z), nats per image
    kl: torch.Tensor  # (B,) sum of the levels' KL, nats per image
    kl_levels: dict[str, torch.Tensor]  # level -> (B,) nats per image

    @property
    def neg_elbo(self) -> torch.Tensor:
        """(B,) the negative ELBO per image, whatever beta or free bits the loss used."""
        return self.recon + self.kl


def elbo_loss(model: VAEFamily, target: torch.Tensor, output: ModelOutput, *, beta: float = 1.0,
              free_bits: float = 0.0) -> LossTerms:
    """Negative ELBO per image, summed over pixels and latent elements, averaged over the batch.

    Summing per image (not averaging over pixels) keeps the balance between reconstruction and KL
    that the ELBO defines (Kingma & Welling 2014); averaging silently multiplies the KL weight by
    the pixel count. `free_bits` (nats per latent element, Kingma et al. 2016) stops the optimiser from
    pushing an element's batch-averaged KL below that floor.
    """
    recon = -model.log_likelihood(target, output.logits)  # (B,)
    kl_levels = output.kl_per_level()
    kl = sum(kl_levels.values())  # (B,)
    if free_bits > 0:
        kl_term = recon.new_zeros(())
        for per_element in output.kl_terms.values():
            mean = per_element.flatten(1).mean(0)  # (N,)
            # Which elements sit below the floor is decided on the global batch, so DDP stays exact.
            active = model.reduce_mean(mean.detach()) > free_bits
            kl_term = kl_term + torch.where(active, mean, torch.full_like(mean, free_bits)).sum()
    else:
        kl_term = kl.mean()
    loss = recon.mean() + beta * kl_term if beta > 0 else recon.mean()
    return LossTerms(loss, recon.detach(), kl.detach(), {k: v.detach() for k, v in kl_levels.items()})
