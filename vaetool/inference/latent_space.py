"""Latents of every family as level dicts: each level's posterior, shape checks, prior draws, paths and sweeps.

Latents are `{level: (N, ...)}` in top-down order (models/base.py). Everything here works for the
vector, spatial and hierarchical families alike; a hierarchy's levels below a given one come from
their conditional priors, p(z_l | z_<l), through `model.sample_prior(given=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..errors import ConfigError, DataError
from ..io.latents import lerp, slerp
from ..models.base import DiagonalGaussian, FactorizedPosterior, Latents, Posterior, VAEFamily, level_temperatures

PRIORS = ("auto", "fitted", "standard")
DRAW_BATCH = 64  # rows per prior pass; the noise is drawn for every row first, so this never changes a sample


@dataclass
class LevelPosteriors:
    """Each level's Gaussian for a batch: a factorized family's own; in a hierarchy, q(z_l | x, z_<l) with
    the levels above at their means (the path `mode()` takes), so the means decode to the reconstruction."""

    levels: dict[str, DiagonalGaussian]  # level -> (B, ...)
    kl: dict[str, torch.Tensor]  # level -> (B,) KL to that level's prior, nats


def posterior_levels(posterior: Posterior) -> LevelPosteriors:
    """Every level's posterior Gaussian and KL, for any family's posterior."""
    if isinstance(posterior, FactorizedPosterior):
        return LevelPosteriors(dict(posterior.levels), {n: q.kl() for n, q in posterior.levels.items()})
    top = posterior.top  # the hierarchy's q(top | x); the levels below come from one top-down pass at the means
    levels, kl = {"top": top}, {"top": top.kl()}

    def pick(name: str, q: DiagonalGaussian, p: DiagonalGaussian) -> torch.Tensor:
        levels[name], kl[name] = q, q.kl(p)
        return q.mode()

    posterior.model.top_down(top.mode(), tuple(posterior.skips[-1].shape[-2:]), pick, top_q=top,
                             skips=posterior.skips, to_pixels=False)
    return LevelPosteriors(levels, kl)


def level_names(model: VAEFamily) -> list[str]:
    size = model.config.image_size
    return list(model.latent_shapes(size, size))


def fit_levels(model: VAEFamily, latents: Latents, source: str) -> tuple[int, int]:
    """The image size (H, W) the latents decode to; DataError naming `source` when their levels or shapes
    do not fit the model."""
    size = model.config.image_size
    reference = model.latent_shapes(size, size)
    if set(latents) != set(reference):
        raise DataError(f"{source}: the latents hold the level(s) {', '.join(latents)} but this {model.kind} model's "
                        f"levels are {', '.join(reference)}; use latents encoded with the same checkpoint")
    height = width = size
    maps = [name for name, shape in reference.items() if len(shape) == 3]
    if maps and latents[maps[-1]].ndim == 4:  # spatial levels set the image size: the finest one, times its factor
        factor = size // reference[maps[-1]][-1]
        height, width = (factor * int(s) for s in latents[maps[-1]].shape[-2:])
    try:
        expected = model.latent_shapes(height, width)
    except DataError:
        expected = reference
    for name, shape in expected.items():
        got = tuple(latents[name].shape[1:])
        if got == shape:
            continue
        if len(shape) == 1 and len(got) == 1:
            raise DataError(f"{source}: latents are {got[0]}-dimensional but the checkpoint's "
                            f"latent_dim is {shape[0]}; use latents encoded with the same checkpoint")
        raise DataError(f"{source}: latent level {name} has shape {got}; this model's is {shape} (for {height}x"
                        f"{width} images); use latents encoded with the same checkpoint")
    return height, width


def rows_of(latents: Latents, index: slice | list[int]) -> Latents:
    return {name: value[index] for name, value in latents.items()}


def count_of(latents: Latents) -> int:
    return len(next(iter(latents.values())))


def draw(model: VAEFamily, count: int, *, given: Latents | None = None, temperature: float | dict[str, float] = 1.0,
         generator: torch.Generator | None = None, size: tuple[int, int] | None = None,
         batch_size: int = DRAW_BATCH) -> Latents:
    """`count` latents on the CPU from the prior, the levels in `given` kept and the rest drawn given them.

    All the noise is drawn first, level by level in top-down order from a CPU generator, so a seed gives
    the same latents whatever the batch size and device.
    """
    size = size or (model.config.image_size, model.config.image_size)
    shapes = model.latent_shapes(*size)
    given = given or {}
    noise = {name: torch.randn(count, *shape, generator=generator) for name, shape in shapes.items()
             if name not in given}
    parts: list[Latents] = []
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            rows = slice(start, start + batch_size)
            part = model.sample_prior(len(range(count)[rows]), temperature=temperature, size=size,
                                      given=rows_of(given, rows), noise=rows_of(noise, rows))
            parts.append({name: value.float().cpu() for name, value in part.items()})
    return {name: torch.cat([p[name] for p in parts]) for name in shapes}


def sample_latents(checkpoint: Checkpoint, count: int, *, temperature: float | dict[str, float] = 1.0, seed: int = 0,
                   size: tuple[int, int] | None = None, prior: str = "auto", batch_size: int = DRAW_BATCH) -> Latents:
    """`count` latents from the model's prior, on the CPU: ancestral for a hierarchy, with a temperature per level.

    `prior`: "standard" is the model's own prior; "fitted" draws the level a fitted prior models from it
    (the levels below from their conditional priors given it); "auto" is "fitted" when the checkpoint has one.
    """
    if prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}; use one of {', '.join(PRIORS)}")
    model, fitted = checkpoint.model, getattr(checkpoint, "prior", None)
    if prior == "fitted" and fitted is None:
        raise ConfigError("this checkpoint has no fitted prior; run `vaetool fit-prior CKPT DATA` to fit one, "
                          "or sample with --prior standard")
    generator = torch.Generator().manual_seed(seed)
    given: Latents = {}
    if fitted is not None and prior != "standard":
        shapes = model.latent_shapes(*(size or (model.config.image_size,) * 2))
        if tuple(fitted.shape) != tuple(shapes.get(fitted.level, ())):
            raise ConfigError(f"the fitted prior models {fitted.level} latents of shape {tuple(fitted.shape)}, not "
                              f"{shapes.get(fitted.level)}; sample at the training image size or with --prior standard")
        level_t = level_temperatures(temperature, list(shapes))[fitted.level]
        given = {fitted.level: fitted.sample(count, generator=generator, temperature=level_t)}
    return draw(model, count, given=given, temperature=temperature, generator=generator, size=size,
                batch_size=batch_size)


def complete_below(checkpoint: Checkpoint, given: Latents, *, temperature: float = 0.0, seed: int = 0) -> Latents:
    """The given levels plus the others from their (conditional) priors at `temperature`: 0 gives the
    prior means, T > 0 draws from the seed. A family without conditional priors gets zeros times T noise."""
    model = checkpoint.model
    if set(given) == set(level_names(model)):
        return dict(given)
    generator = torch.Generator().manual_seed(seed)
    return draw(model, count_of(given), given=given, temperature=temperature, generator=generator)


def level_path(anchors: Latents, *, steps: int, method: str) -> Latents:
    """Frames through consecutive anchors (K, ...) level by level, with the same t on every level:
    `steps` per segment, shared endpoints once -> (F, ...). A map level is walked as one vector."""
    if method not in ("slerp", "lerp"):
        raise DataError(f"unknown interpolation method {method!r}; use slerp or lerp")
    step = slerp if method == "slerp" else lerp
    t = torch.linspace(0.0, 1.0, steps)
    frames = {}
    for name, values in anchors.items():
        flat = values.flatten(1)  # (K, numel)
        path = torch.cat([step(flat[i], flat[i + 1], t if i == 0 else t[1:]) for i in range(len(flat) - 1)])
        frames[name] = path.reshape(len(path), *values.shape[1:])
    return frames


def interpolate_latents(checkpoint: Checkpoint, anchors: Latents, *, steps: int, method: str = "slerp",
                        levels: str = "all", temperature: float = 0.0, seed: int = 0) -> Latents:
    """Frames between anchors: every level's posterior means walked together (`levels="all"`), or only
    the hierarchy's top (`"top"`), the levels below from their conditional priors at `temperature`."""
    model = checkpoint.model
    if levels == "all":
        return level_path(anchors, steps=steps, method=method)
    if levels != "top":
        raise ConfigError(f"unknown --levels {levels!r}; use all or top")
    if model.kind != "hierarchical":
        raise ConfigError(f"--levels top needs a hierarchical model; a {model.kind} model's latents are walked "
                          f"whole (drop --levels)")
    top = level_path({"top": anchors["top"]}, steps=steps, method=method)
    return complete_below(checkpoint, top, temperature=temperature, seed=seed)


def vector_level(checkpoint: Checkpoint) -> str:
    """The level `traverse` sweeps; a one-line ConfigError for a family without one."""
    model = checkpoint.model
    if model.vector_level is None:
        raise ConfigError(f"a {model.kind} model has no latent vector to traverse: its latent is a map of "
                          f"{model.config.latent_channels} channels per position, whose dimensions are places, "
                          f"not properties; use `vaetool interpolate` between images, or train with --model vector "
                          f"to explore single dimensions")
    return model.vector_level


def traverse_latents(checkpoint: Checkpoint, base: torch.Tensor, dims: list[int], *, steps: int,
                     span: float) -> Latents:
    """Latents (len(dims) * steps, ...): row r sweeps dimension dims[r] of the vector level over base +- span
    (prior sigmas); levels below come from their conditional prior means given the swept vector."""
    name = vector_level(checkpoint)
    offsets = torch.linspace(-span, span, steps)
    rows = []
    for dim in dims:
        z = base.repeat(steps, 1)  # (steps, D)
        z[:, dim] = base[dim] + offsets
        rows.append(z)
    return complete_below(checkpoint, {name: torch.cat(rows)}, temperature=0.0)
