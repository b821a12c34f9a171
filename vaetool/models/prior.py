"""A prior fitted to the aggregate posterior: a full-covariance Gaussian mixture by EM, stored beside the weights.

A VAE's posterior means do not fill N(0, I); decoding latents from where no training image sits gives
blobs. Fitting a density to the training images' posterior means after training and sampling from it
("ex-post density estimation", Ghosh et al. 2020; cf. the two-stage VAE of Dai & Wipf 2019) puts the
samples where the decoder has learned to draw.

The fit runs in float64 (EM's covariance updates lose definiteness in float32); the fitted parameters
are kept in float32, as the model's weights are. The number of components is chosen by the mean
log-likelihood of held-out latents (`select_mixture`).

Latents of any shape are flattened to vectors of D = prod(shape) numbers. A full covariance needs
D(D+1)/2 numbers per component and, to be estimated at all, more latents than D per component, so
above `max_dims` (512: a vector latent, or a small spatial map such as 8 x 8 x 8) the mixture is fitted
in the span of the top `reduced_dims` principal directions of the latents, and the rest of the space
gets one isotropic Gaussian whose variance is the mean variance left outside that span (probabilistic
PCA, Tipping & Bishop 1999). That keeps a proper density on all of R^D and a checkpoint of a few MB,
where a diagonal Gaussian per position would lose the correlations between neighbouring positions that
make a latent map decode to something coherent. A prior over a flattened map applies to maps of the
size it was fitted on (the training image size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, ConfigError

LOG_2PI = math.log(2 * math.pi)
MAX_DIMS = 512  # above this many numbers per latent, the mixture lives in a principal subspace
REDUCED_DIMS = 128
KMEANS_ITERATIONS = 10  # Lloyd steps after k-means++ seeding: cheap, and EM starts from sensible clusters


@dataclass
class FittedPrior:
    """A Gaussian mixture over one latent level, optionally in a principal subspace with an isotropic rest.

    With a projection, a latent z (D,) is y = (z - center) @ basis (d,) plus a residual r orthogonal to
    the basis: p(z) = mixture(y) * N(r; 0, residual_std^2 I) over the D - d remaining directions.
    """

    level: str  # the latent level it applies to: "z", or the hierarchical family's "top"
    shape: tuple[int, ...]  # one latent's shape, without the batch: (D,) or (C, h, w)
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, d)
    scale_tril: torch.Tensor  # (K, d, d) lower Cholesky factors of the covariances
    center: torch.Tensor | None = None  # (D,) with a projection
    basis: torch.Tensor | None = None  # (D, d) orthonormal columns
    residual_std: float = 0.0
    held_out: float = float("nan")  # mean held-out log-likelihood per latent (nats) of the chosen size
    scores: dict[int, float] = field(default_factory=dict)  # candidate components -> held-out score

    kind = "mixture"

    @property
    def components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dims(self) -> int:
        return math.prod(self.shape)

    def _mixture_log_prob(self, y: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(y, self.weights.double(), self.means.double(), self.scale_tril.double())

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for latents z (N, *shape), (N,) nats, in z's floating dtype."""
        flat = _flatten(z, self.shape).double()  # (N, D)
        if self.basis is None:
            return self._mixture_log_prob(flat).to(z.dtype)
        centered = flat - self.center.double()
        y = centered @ self.basis.double()  # (N, d)
        rest = centered - y @ self.basis.double().T  # (N, D)
        others = self.dims - self.basis.shape[1]
        log_std = math.log(max(self.residual_std, 1e-30))
        residual = -0.5 * rest.pow(2).sum(1) / max(self.residual_std, 1e-30) ** 2 - others * (log_std + 0.5 * LOG_2PI)
        return (self._mixture_log_prob(y) + residual).to(z.dtype)

    def sample(self, count: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Draw (count, *shape) float32 latents on the CPU; the same generator state gives the same latents.

        Temperature multiplies every standard deviation (each covariance by T^2), as the standard
        prior's `temperature` does, so `--temperature` means the same whichever prior samples.
        """
        which = torch.multinomial(self.weights.double(), count, replacement=True, generator=generator)  # (count,)
        eps = torch.randn(count, self.means.shape[1], generator=generator, dtype=torch.float64)  # (count, d)
        y = self.means.double()[which] + temperature * torch.einsum("nij,nj->ni", self.scale_tril.double()[which], eps)
        if self.basis is None:
            return y.float().reshape(count, *self.shape)
        basis = self.basis.double()
        noise = torch.randn(count, self.dims, generator=generator, dtype=torch.float64)  # (count, D)
        noise = noise - (noise @ basis) @ basis.T  # only the directions the mixture does not model
        z = self.center.double() + y @ basis.T + (temperature * self.residual_std) * noise
        return z.float().reshape(count, *self.shape)

    def to_tensors(self, prefix: str = "prior.") -> dict[str, torch.Tensor]:
        """Named CPU tensors for a safetensors file, keys `{prefix}{level}.{field}`; `from_tensors` reverses it."""
        key = f"{prefix}{self.level}."
        candidates = sorted(self.scores)
        tensors = {
            "weights": self.weights, "means": self.means, "scale_tril": self.scale_tril,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "held_out": torch.tensor([self.held_out], dtype=torch.float64),
            "candidates": torch.tensor(candidates, dtype=torch.int64),
            "scores": torch.tensor([self.scores[k] for k in candidates], dtype=torch.float64),
        }
        if self.basis is not None:
            tensors |= {"center": self.center, "basis": self.basis,
                        "residual_std": torch.tensor([self.residual_std], dtype=torch.float64)}
        return {key + name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, prefix: str = "prior.",
                     level: str | None = None) -> FittedPrior:
        """The prior stored by `to_tensors`; `level` picks one when several levels have a prior."""
        found = prior_levels(tensors, prefix=prefix)
        if level is None and len(found) == 1:
            level = found[0]
        if level not in found:
            raise CheckpointError(f"no fitted prior for level {level!r} in the checkpoint (it has: "
                                  f"{', '.join(found) or 'none'}); run `vaetool fit-prior` to fit one")
        get = {name[len(f"{prefix}{level}."):]: t for name, t in tensors.items() if name.startswith(f"{prefix}{level}.")}
        try:
            prior = cls(level=level, shape=tuple(int(s) for s in get["shape"].tolist()), weights=get["weights"],
                        means=get["means"], scale_tril=get["scale_tril"], center=get.get("center"),
                        basis=get.get("basis"), held_out=float(get["held_out"][0]),
                        residual_std=float(get["residual_std"][0]) if "residual_std" in get else 0.0,
                        scores=dict(zip(get["candidates"].tolist(), get["scores"].tolist())))
        except KeyError as exc:
            raise CheckpointError(f"the fitted prior for level {level!r} lacks {prefix}{level}.{exc.args[0]}; "
                                  f"run `vaetool fit-prior` again") from None
        prior._check()
        return prior

    def _check(self) -> None:
        k, d = self.means.shape
        reduced = self.basis is not None
        ok = (self.weights.shape == (k,) and self.scale_tril.shape == (k, d, d)
              and (not reduced or (self.basis.shape == (self.dims, d) and self.center.shape == (self.dims,)))
              and (reduced or d == self.dims))
        if not ok:
            raise CheckpointError(f"the fitted prior for level {self.level!r} has inconsistent shapes; "
                                  f"run `vaetool fit-prior` again")

    def describe(self) -> dict[str, object]:
        """A JSON-able summary: level, shape, components, reduction, held-out scores."""
        return {"kind": self.kind, "level": self.level, "shape": list(self.shape), "components": self.components,
                "reduced_dims": None if self.basis is None else int(self.basis.shape[1]),
                "held_out_log_likelihood": self.held_out,
                "scores": {str(k): v for k, v in sorted(self.scores.items())}}


def prior_levels(tensors: dict[str, torch.Tensor], *, prefix: str = "prior.") -> list[str]:
    """The levels that have a fitted mixture among a checkpoint's tensors (a level's name has no dot: the
    tensors of a second-stage prior, `{level}.stage2.*`, hold a mixture of their own and are not levels)."""
    suffix = ".weights"
    levels = (name[len(prefix):-len(suffix)] for name in tensors if name.startswith(prefix) and name.endswith(suffix))
    return sorted(level for level in levels if "." not in level)


def prior_level(levels: Sequence[str]) -> str:
    """The level a fitted prior models: a one-level family's only level, else the hierarchy's "top"."""
    if len(levels) == 1:
        return levels[0]
    if "top" in levels:
        return "top"
    raise ConfigError(f"cannot tell which of the levels {', '.join(levels)} a fitted prior is for; name one")


def _flatten(z: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(z.shape[1:]) != tuple(shape):
        raise ConfigError(f"latents of shape {tuple(z.shape[1:])} do not fit a prior fitted on {tuple(shape)}; "
                          f"use images of the size the prior was fitted at")
    return z.reshape(z.shape[0], -1)  # (N, D)


def mixture_log_prob(y: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                     scale_tril: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k N(y; mu_k, L_k L_k^T) for y (N, d), (N,)."""
    return torch.logsumexp(_component_log_probs(y, means, scale_tril) + weights.log(), dim=1)


def _component_log_probs(y: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(y_n; mu_k, L_k L_k^T), (N, K), via triangular solves (no inverse, no determinant)."""
    diff = (y.unsqueeze(0) - means.unsqueeze(1)).transpose(1, 2)  # (K, d, N)
    white = torch.linalg.solve_triangular(scale_tril, diff, upper=False)  # (K, d, N)
    log_det = scale_tril.diagonal(dim1=1, dim2=2).log().sum(1)  # (K,) half the log-determinant
    d = y.shape[1]
    return (-0.5 * white.pow(2).sum(1) - log_det.unsqueeze(1) - 0.5 * d * LOG_2PI).T  # (N, K)


def _kmeans_pp(y: torch.Tensor, components: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) and a few Lloyd steps: (K, d) centres."""
    n = y.shape[0]
    first = torch.randint(n, (1,), generator=generator)
    centres = [y[first[0]]]
    nearest = (y - centres[0]).pow(2).sum(1)  # (N,) squared distance to the nearest centre so far
    for _ in range(1, components):
        if float(nearest.sum()) <= 0:  # every point sits on a centre: pick any
            pick = torch.randint(n, (1,), generator=generator)[0]
        else:
            pick = torch.multinomial(nearest, 1, generator=generator)[0]
        centres.append(y[pick])
        nearest = torch.minimum(nearest, (y - y[pick]).pow(2).sum(1))
    centres = torch.stack(centres)  # (K, d)
    for _ in range(KMEANS_ITERATIONS):
        assign = torch.cdist(y, centres).argmin(1)  # (N,)
        counts = torch.bincount(assign, minlength=components).to(y.dtype)  # (K,)
        sums = torch.zeros_like(centres).index_add_(0, assign, y)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return centres


def _cholesky(cov: torch.Tensor, reg: float) -> torch.Tensor:
    """Cholesky factors of (K, d, d) covariances, adding more ridge where one is not positive definite."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    ridge = reg
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(cov)
        if not bool((info > 0).any()):
            return factor
        bad = (info > 0).to(cov.dtype)[:, None, None]
        ridge = max(ridge * 10, 1e-10)
        cov = cov + bad * ridge * eye
    raise ConfigError(f"the mixture's covariances stay singular even with a ridge of {ridge:g}; use a larger reg")


def _m_step(y: torch.Tensor, resp: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights (K,), means (K, d) and Cholesky factors (K, d, d) from responsibilities (N, K)."""
    counts = resp.sum(0)  # (K,)
    means = (resp.T @ y) / counts[:, None]  # (K, d)
    diff = y.unsqueeze(0) - means.unsqueeze(1)  # (K, N, d)
    cov = ((diff * resp.T.unsqueeze(2)).transpose(1, 2) @ diff) / counts[:, None, None]  # (K, d, d), one bmm
    cov = cov + reg * torch.eye(y.shape[1], dtype=y.dtype)
    return counts / counts.sum(), means, _cholesky(cov, reg)


def _em(y: torch.Tensor, *, components: int, generator: torch.Generator | None, iterations: int, tol: float,
        reg: float, min_count: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a K-component full-covariance mixture to y (N, d) float64 by EM (Dempster et al. 1977)."""
    centres = _kmeans_pp(y, components, generator)
    resp = torch.nn.functional.one_hot(torch.cdist(y, centres).argmin(1), components).to(y.dtype)  # (N, K)
    previous = -math.inf
    for _ in range(iterations):
        # A component that explains fewer than `min_count` latents has no covariance to estimate and
        # would shrink onto a point (a likelihood spike that does not generalise): drop it.
        keep = resp.sum(0) >= min_count
        if not bool(keep.all()):
            resp = resp[:, keep] / resp[:, keep].sum(1, keepdim=True).clamp_min(1e-300)
        weights, means, tril = _m_step(y, resp, reg)
        joint = _component_log_probs(y, means, tril) + weights.log()  # (N, K)
        log_lik = torch.logsumexp(joint, dim=1)  # (N,)
        resp = (joint - log_lik[:, None]).exp()
        current = float(log_lik.mean())
        if current - previous < tol:
            break
        previous = current
    return weights, means, tril


def _project(flat: torch.Tensor, reduced_dims: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Centre (D,), the top principal directions (D, d) and the rest's std, from latents (N, D) float64."""
    center = flat.mean(0)
    _, singular, vh = torch.linalg.svd(flat - center, full_matrices=False)  # vh (min(N, D), D)
    d = min(reduced_dims, vh.shape[0])
    variances = singular.pow(2) / max(flat.shape[0] - 1, 1)  # (min(N, D),) along each principal direction
    others = flat.shape[1] - d
    # The directions past min(N, D) have no sample variance at all; they share the leftover as PPCA does.
    residual_var = float(variances[d:].sum()) / others if others else 0.0
    return center, vh[:d].T.contiguous(), math.sqrt(max(residual_var, 1e-12))


def fit_mixture(z: torch.Tensor, *, components: int, generator: torch.Generator | None = None,
                iterations: int = 100, tol: float = 1e-3, reg: float = 1e-4, level: str = "z",
                max_dims: int = MAX_DIMS, reduced_dims: int = REDUCED_DIMS, min_count: float = 2.0,
                projection: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> FittedPrior:
    """Fit a `components`-component full-covariance Gaussian mixture to latents z (N, *shape) by EM.

    Seeded by k-means++ from `generator`; `reg` is added to every covariance's diagonal; EM stops
    after `iterations` or when the mean log-likelihood gains less than `tol` nats. Components that
    collapse (fewer than `min_count` latents) are dropped, so the result may have fewer components.
    Latents of more than `max_dims` numbers are modelled in their top `reduced_dims` principal
    directions (see the module docstring); `projection` (center, basis, residual std) passes them in
    when they are already known, so several fits to the same latents share one SVD.
    """
    if z.ndim < 2 or z.shape[0] < max(components, 2):
        raise ConfigError(f"fitting a {components}-component prior needs at least {max(components, 2)} latents, "
                          f"got {z.shape[0] if z.ndim else 0}; give more images")
    if not bool(torch.isfinite(z).all()):
        raise ConfigError("the latents to fit a prior to contain NaN or infinity; check the checkpoint")
    shape = tuple(z.shape[1:])
    flat = z.detach().reshape(z.shape[0], -1).to("cpu", torch.float64)  # (N, D)
    center = basis = None
    residual_std = 0.0
    y = flat
    if flat.shape[1] > max_dims:
        center, basis, residual_std = projection or _project(flat, reduced_dims)
        y = (flat - center) @ basis  # (N, d)
    weights, means, tril = _em(y, components=components, generator=generator, iterations=iterations, tol=tol,
                               reg=reg, min_count=min_count)
    return FittedPrior(level=level, shape=shape, weights=weights.float(), means=means.float(),
                       scale_tril=tril.float(), center=None if center is None else center.float(),
                       basis=None if basis is None else basis.float(), residual_std=residual_std)


def select_mixture(z: torch.Tensor, *, candidates: Sequence[int] = (1, 2, 4, 8, 16, 32), held_out: float = 0.2,
                   generator: torch.Generator | None = None, patience: int | None = None,
                   **fit_options: object) -> FittedPrior:
    """Choose the number of components by held-out log-likelihood, then refit on every latent.

    A random `held_out` fraction of z (N, *shape) scores each candidate fitted on the rest; the best
    is refitted on all of z. The returned prior's `scores` hold each candidate's mean held-out
    log-likelihood per latent (nats); candidates with more components than training latents are skipped.
    With `patience`, the candidates (in increasing order) stop after that many in a row fail to beat
    the best so far: the larger mixtures cost the most and past the best size the score rarely recovers.
    `fit_options` go to `fit_mixture`.
    """
    if not 0.0 < held_out < 1.0:
        raise ConfigError(f"held_out must be a fraction between 0 and 1, not {held_out}")
    n = z.shape[0]
    order = torch.randperm(n, generator=generator)
    n_test = max(1, round(held_out * n))
    test, train = z[order[:n_test]], z[order[n_test:]]
    scores: dict[int, float] = {}
    misses = 0
    projection = None  # the training split's principal directions, computed once for every candidate
    if math.prod(z.shape[1:]) > fit_options.get("max_dims", MAX_DIMS):
        flat = train.detach().reshape(train.shape[0], -1).to("cpu", torch.float64)
        projection = _project(flat, int(fit_options.get("reduced_dims", REDUCED_DIMS)))
    for k in sorted(set(candidates)):
        if k < 1 or k > train.shape[0] // 2:
            continue
        prior = fit_mixture(train, components=k, generator=generator, projection=projection, **fit_options)
        scores[k] = float(prior.log_prob(test.double()).mean())
        misses = 0 if scores[k] >= max(scores.values()) else misses + 1
        if patience is not None and misses >= patience:
            break
    if not scores:
        raise ConfigError(f"{n} latents are too few to choose among {list(candidates)} components; give more images")
    best = max(scores, key=lambda k: (scores[k], -k))
    prior = fit_mixture(z, components=best, generator=generator, **fit_options)
    prior.held_out, prior.scores = scores[best], scores
    return prior
