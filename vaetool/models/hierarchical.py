"""The `hierarchical` family: a top vector latent and spatial latent levels below it, with learned conditional priors.

A top-down VAE (Ladder VAE, Sønderby et al. 2016; NVAE, Vahdat & Kautz 2020; VDVAE, Child 2021).
A bottom-up path of conv stages reads the image; the top latent `top` (B, D) comes from its pooled
coarsest features and has a N(0, I) prior: what the image is. A top-down path starts from `top` and,
at every resolution from the coarsest (1/2**len(widths)) down to 1/downsample, draws `level_cells`
spatial latents z_l (B, C, h, w) named by their factor ("z16", "z8", "z4"; further cells "z8_1"). Each
has a prior p(z_l | z_<l) read from the top-down state and a posterior q(z_l | x, z_<l) that combines
that state with the bottom-up features at the same resolution. ELBO = log p(x|z) - sum_l KL(q_l || p_l),
each KL in closed form and float32.

What keeps it stable, cheaply (instead of NVAE's spectral regularisation, which costs a power
iteration per layer per step):
- The posterior is an offset of the prior (NVAE's residual Normal): q = N(mu_p + dmu, (sigma_p * dsigma)^2),
  so the KL depends on the offsets, not on how the prior moves.
- Means and log-stds go through a soft clamp, 5 tanh(x / 5) (NVAE), so no step can make a variance
  vanish or explode; the KL per element stays bounded.
- Every cell starts near the identity: the prior's conv starts small (VDVAE zero-initialises it), and the
  latent projection and the residual conv are scaled by sqrt(1 / cells) (VDVAE).
- GroupNorm, never BatchNorm, so each image's pass depends on that image alone (DDP stays exact).
Gradient skipping, VDVAE's remaining trick, belongs to the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .base import (DiagonalGaussian, ImportanceSample, Latents, ModelOutput, Posterior, VAEFamily, as_latents,
                   check_given, level_temperatures, register, standard_normal_log_prob)
from .layers import (GroupNorm32, ResidualBlock, encoder_stages, full_precision, groups, output_conv, run_down,
                     run_output, scale_init_, up_stages)

TOP = "top"
LOG_STD_BOUND = 5.0  # NVAE's soft clamp: std within [e^-5, e^5] per distribution
PRIOR_INIT_SCALE = 0.1  # the prior conv starts small, so p starts near N(0, I) and the state near unchanged

# How the top-down pass picks a level's z from its posterior (None when generating) and its prior.
Pick = Callable[[str, "DiagonalGaussian | None", DiagonalGaussian], torch.Tensor]


def soft_clamp(x: torch.Tensor, bound: float = LOG_STD_BOUND) -> torch.Tensor:
    """bound * tanh(x / bound): the identity near 0, never beyond +-bound, with a gradient everywhere."""
    return bound * torch.tanh(x / bound)


def bounded_gaussian(mean: torch.Tensor, log_std: torch.Tensor) -> DiagonalGaussian:
    return DiagonalGaussian(soft_clamp(mean), 2.0 * soft_clamp(log_std))


class LatentCell(nn.Module):
    """One latent group of the top-down path: p(z | h), q(z | x, h), then h <- res(h + proj(z)) (VDVAE's block)."""

    def __init__(self, width: int, latent_channels: int, *, depth: int) -> None:
        super().__init__()
        self.prior_norm = GroupNorm32(groups(width), width)
        self.prior = scale_init_(nn.Conv2d(width, 2 * latent_channels, 3, padding=1), PRIOR_INIT_SCALE)
        # The prior net's features for the state (VDVAE's `xpp`): not a distribution's parameter, so it runs
        # at the autocast precision; only the two convs that set distributions run in float32.
        self.prior_features = scale_init_(nn.Conv2d(width, width, 3, padding=1), PRIOR_INIT_SCALE)
        self.posterior_norm = GroupNorm32(groups(2 * width), 2 * width)
        self.posterior = nn.Conv2d(2 * width, 2 * latent_channels, 3, padding=1)
        self.proj = scale_init_(nn.Conv2d(latent_channels, width, 1), math.sqrt(1.0 / depth))
        self.res = ResidualBlock(width)
        scale_init_(self.res.conv, math.sqrt(1.0 / depth))

    def prior_of(self, h: torch.Tensor) -> tuple[DiagonalGaussian, torch.Tensor]:
        """p(z | h) and the state plus the prior net's extra features (VDVAE's `xpp`)."""
        a = F.silu(self.prior_norm(h))  # (B, W, h, w)
        mean, log_std = full_precision(self.prior, a).chunk(2, dim=1)  # (B, C_z, h, w) each, float32
        return bounded_gaussian(mean, log_std), h + self.prior_features(a)

    def posterior_of(self, h: torch.Tensor, skip: torch.Tensor, prior: DiagonalGaussian) -> DiagonalGaussian:
        """q(z | x, z_<l) as offsets of the prior (NVAE's residual Normal), from the state and bottom-up features."""
        both = torch.cat([h, skip], dim=1)  # (B, 2W, h, w)
        offset_mean, offset_log_std = full_precision(self.posterior, F.silu(self.posterior_norm(both))).chunk(2, dim=1)
        return DiagonalGaussian(prior.mu + soft_clamp(offset_mean), prior.logvar + 2.0 * soft_clamp(offset_log_std))

    def update(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.res(h + full_precision(self.proj, z).to(h.dtype))  # (B, W, h, w)


class BottomUp(nn.Module):
    """The encoder's conv stages, keeping every resolution's features, and the top latent's posterior."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.patch, width = config.patch, config.widths[-1]
        self.stages = encoder_stages(config)
        self.top_norm = GroupNorm32(groups(width), width)
        self.top_head = nn.Linear(width, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[DiagonalGaussian, list[torch.Tensor]]:
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)  # (B, 4C, H/2, W/2)
        skips = run_down(self.stages, x)  # finest first: (B, W_i, H/2^(i+1), W/2^(i+1))
        # Pooled, not flattened: the top latent says what the image is, at any image size.
        pooled = F.silu(self.top_norm(skips[-1])).mean(dim=(2, 3))  # (B, W_last)
        mean, log_std = full_precision(self.top_head, pooled).chunk(2, dim=1)  # (B, D) each
        return bounded_gaussian(mean, log_std), skips


class TopDown(nn.Module):
    """The decoder: a learned start map plus the top latent, then latent cells and nearest + conv stages."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths, self.patch = config.widths, config.patch
        factors = [2 ** (i + 1) for i in range(len(widths))]  # resolution index i is 1/factors[i]
        self.plan = [(i, [f"z{factors[i]}" + (f"_{c}" if c else "") for c in range(config.level_cells)]
                      if factors[i] >= config.downsample else []) for i in reversed(range(len(widths)))]
        depth = sum(len(names) for _, names in self.plan)
        bottom = config.bottom_size
        self.start = nn.Parameter(torch.zeros(1, widths[-1], bottom, bottom))  # position, learned (VDVAE's bias_xs)
        self.top_proj = nn.Linear(config.latent_dim, widths[-1])
        self.cells = nn.ModuleDict({name: LatentCell(widths[i], config.latent_channels, depth=depth)
                                    for i, names in self.plan for name in names})
        self.stages = up_stages(widths, blocks=config.blocks, patch=config.patch)
        self.out = output_conv(widths[0], config.channels, config.patch)

    def initial_state(self, top: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, W_last, h, w) at the coarsest resolution: the start map (resized for another image size) plus top."""
        start = self.start
        if tuple(start.shape[-2:]) != tuple(size):
            start = F.interpolate(start, size=size, mode="bilinear", align_corners=False)
        return start + full_precision(self.top_proj, top)[:, :, None, None]


@dataclass
class _Pass:
    """What one top-down pass produced; log densities only when asked for."""

    latents: Latents  # level -> (N, ...)
    logits: torch.Tensor  # (N, C, H, W)
    kl_terms: dict[str, torch.Tensor]  # level -> (N, ...) per element; only levels with a posterior
    log_q: torch.Tensor | None = None  # (N,)
    log_p: torch.Tensor | None = None  # (N,)


def _repeat(value: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (K B, ...), sample-major, so row k B + b is image b."""
    return value.unsqueeze(0).expand(k, *value.shape).reshape(k * value.shape[0], *value.shape[1:])


def _check_levels(values: Latents, names: list[str], what: str) -> None:
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"{what} lacks the level(s) {', '.join(missing)}; this model's levels are {', '.join(names)}")


class HierarchicalPosterior(Posterior):
    """q(z|x) of the hierarchy: the top latent's Gaussian and the bottom-up features at every resolution.

    The levels below the top are conditional, q(z_l | x, z_<l), so `sample`, `mode`, `log_prob` and
    `prior_log_prob` each run the decoder's top-down pass. `.mu` and `.logvar` are the top level's.
    """

    def __init__(self, model: HierarchicalVAE, top: DiagonalGaussian, skips: list[torch.Tensor]) -> None:
        self.model, self.top, self.skips = model, top, skips

    @property
    def mu(self) -> torch.Tensor:
        return self.top.mu  # (B, D)

    @property
    def logvar(self) -> torch.Tensor:
        return self.top.logvar  # (B, D)

    def run(self, *, noise: Latents | None = None, given: Latents | None = None, mode: bool = False,
            generator: torch.Generator | None = None, temperature: float = 1.0, densities: bool = False) -> _Pass:
        """One top-down pass: z from `given`, else the means (`mode`), else drawn with `noise` or `generator`.

        `noise` and `given` may carry a leading sample dimension, (K, B, ...); the results then do too
        (logits stay (K B, C, H, W)).
        """
        values = given if given is not None else noise
        if values is not None:
            _check_levels(values, self.model.level_names, "latents" if given is not None else "noise")
        k = values[TOP].shape[0] if values is not None and values[TOP].ndim == 3 else None
        top_q, skips, flat = self.top, self.skips, values or {}
        if k is not None:
            top_q = DiagonalGaussian(_repeat(top_q.mu, k), _repeat(top_q.logvar, k))
            skips = [_repeat(skip, k) for skip in skips]
            flat = {name: value.flatten(0, 1) for name, value in flat.items()}  # (K B, ...)
        if given is not None:
            top, pick = flat[TOP], (lambda name, q, p: flat[name])
        elif mode:
            top, pick = top_q.mode(), (lambda name, q, p: q.mode())
        else:
            top = top_q.sample(generator, noise=flat.get(TOP), temperature=temperature)
            pick = (lambda name, q, p: q.sample(generator, noise=flat.get(name), temperature=temperature))
        result = self.model.top_down(top, tuple(skips[-1].shape[-2:]), pick, top_q=top_q, skips=skips,
                                     densities=densities)
        return result if k is None else _unflatten(result, k)

    def sample(self, generator: torch.Generator | None = None, *, noise: Latents | torch.Tensor | None = None,
               temperature: float = 1.0) -> Latents:
        return self.run(noise=noise, generator=generator, temperature=temperature).latents

    def mode(self) -> Latents:
        return self.run(mode=True).latents

    def log_prob(self, latents: Latents) -> torch.Tensor:
        return self.run(given=latents, densities=True).log_q

    def prior_log_prob(self, latents: Latents) -> torch.Tensor:
        return self.run(given=latents, densities=True).log_p


def _unflatten(result: _Pass, k: int) -> _Pass:
    """(K B, ...) -> (K, B, ...) for every per-image result except the logits."""
    def split(value: torch.Tensor) -> torch.Tensor:
        return value.view(k, -1, *value.shape[1:])

    return _Pass({n: split(v) for n, v in result.latents.items()}, result.logits,
                 {n: split(v) for n, v in result.kl_terms.items()},
                 None if result.log_q is None else split(result.log_q),
                 None if result.log_p is None else split(result.log_p))


@register
class HierarchicalVAE(VAEFamily):
    """A top-down hierarchical VAE: `top` (B, D), then levels (B, C, H/f, W/f), f from 2**len(widths) to downsample."""

    kind = "hierarchical"
    vector_level = TOP

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.encoder = BottomUp(config)
        self.decoder = TopDown(config)
        self.level_names = [TOP] + [name for _, names in self.decoder.plan for name in names]  # top-down order

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.config.widths)

    def top_down(self, top: torch.Tensor, size: tuple[int, int], pick: Pick, *, top_q: DiagonalGaussian | None = None,
                 skips: list[torch.Tensor] | None = None, densities: bool = False, to_pixels: bool = True) -> _Pass:
        """The decoder's pass from `top` (N, D) at a coarsest resolution of `size`: at each level its prior,
        its posterior (when the bottom-up `skips` are given), z = pick(name, q, p), and KL(q || p)."""
        decoder = self.decoder
        h = decoder.initial_state(top, size)  # (N, W_last, h, w)
        latents, kl = {TOP: top}, {}
        log_p = standard_normal_log_prob(top.float()) if densities else None
        log_q = top_q.log_prob(top) if densities and top_q is not None else None
        if top_q is not None:
            kl[TOP] = top_q.kl_per_dim()  # to N(0, I)
        for step, (index, names) in enumerate(decoder.plan):
            for name in names:
                cell = decoder.cells[name]
                prior, state = cell.prior_of(h)
                q = cell.posterior_of(h, skips[index], prior) if skips is not None else None
                latents[name] = z = pick(name, q, prior)  # (N, C_z, h, w)
                if q is not None:
                    kl[name] = q.kl_per_dim(prior)  # float32: both come from float32 heads
                    log_q = log_q + q.log_prob(z) if densities else None
                log_p = log_p + prior.log_prob(z) if densities else None
                h = cell.update(state, z)
            if not to_pixels and step == len(decoder.plan) - 1:
                return _Pass(latents, h, kl, log_q, log_p)
            if step < len(decoder.stages):
                h = decoder.stages[step](h)
        return _Pass(latents, run_output(decoder.out, h, decoder.patch), kl, log_q, log_p)

    def encode(self, x: torch.Tensor) -> HierarchicalPosterior:
        self.check_size(*x.shape[-2:])
        top, skips = self.encoder(x * 2.0 - 1.0)
        return HierarchicalPosterior(self, top, skips)

    def decode(self, latents: Latents | torch.Tensor) -> torch.Tensor:
        latents = as_latents(latents, dict.fromkeys(self.level_names))
        _check_levels(latents, self.level_names, "latents")
        size = tuple(latents[self.level_names[1]].shape[-2:])  # the coarsest spatial level's
        return self.top_down(latents[TOP], size, lambda name, q, p: latents[name]).logits

    def forward(self, x: torch.Tensor, *, sample: bool = True, noise: Latents | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        posterior = self.encode(x)
        noise = as_latents(noise, dict.fromkeys(self.level_names)) if noise is not None else None
        result = posterior.run(noise=noise, generator=generator, mode=not sample)
        return ModelOutput(result.latents, result.logits, result.kl_terms, posterior)

    def importance_sample(self, posterior: HierarchicalPosterior, noise: Latents) -> ImportanceSample:
        """One top-down pass per batch of K samples: latents, logits, log q and log p together."""
        result = posterior.run(noise=noise, densities=True)
        return ImportanceSample(result.latents, result.logits, result.log_q, result.log_p)

    def latent_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        self.check_size(height, width)
        shapes: dict[str, tuple[int, ...]] = {TOP: (self.config.latent_dim,)}
        for index, names in self.decoder.plan:
            factor = 2 ** (index + 1)
            shapes.update({name: (self.config.latent_channels, height // factor, width // factor) for name in names})
        return shapes

    @torch.no_grad()
    def sample_prior(self, count: int, *, temperature: float | dict[str, float] = 1.0,
                     generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
                     given: Latents | None = None, noise: Latents | None = None) -> Latents:
        """Ancestral sampling, z_l ~ p(z_l | z_<l) with each level's std times its temperature (VDVAE);
        a level in `given` is taken as it is, and the levels below are drawn given it."""
        size = size or (self.config.image_size, self.config.image_size)
        shapes = self.latent_shapes(*size)
        temperatures = level_temperatures(temperature, list(shapes))
        given = {name: value.to(self.device) for name, value in check_given(given, shapes, count).items()}
        noise = dict(noise or {})
        for name, shape in shapes.items():  # top-down order, so a seed gives the same draws level by level
            if name not in given and name not in noise:
                noise[name] = torch.randn(count, *shape, generator=generator)
        noise = {name: value.to(self.device) for name, value in noise.items()}
        bottom = (size[0] // self.size_multiple, size[1] // self.size_multiple)

        def pick(name: str, q: DiagonalGaussian | None, p: DiagonalGaussian) -> torch.Tensor:
            if name in given:
                return given[name]
            return p.sample(noise=noise[name], temperature=temperatures[name])

        top = given[TOP] if TOP in given else temperatures[TOP] * noise[TOP]
        return self.top_down(top, bottom, pick, to_pixels=False).latents

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior means level by level, in one top-down pass."""
        return self.mean_image(self(x, sample=False).logits)
