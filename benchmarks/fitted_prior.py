"""Which density over a trained model's latents samples best: N(0, I), Gaussian mixtures of several sizes, a second-stage VAE.

    python benchmarks/fitted_prior.py runs/faces faces/ --samples 400 --components 1,4,16

Encodes the images to posterior means (of the top level for a hierarchical model), holds out a
seeded fifth of them, fits each density to the rest, and scores it two ways:
  - the mean log-likelihood of the held-out posterior means (nats per latent; higher is better;
    the second-stage VAE's is an importance-weighted lower bound, Burda et al. 2015);
  - the classifier two-sample test (vaetool/inference/sample_metric.py) of decoded samples against the
    held-out real images: accuracy 0.5 means indistinguishable.
The first row decodes the held-out images' own posterior means: the best any prior can do with this
decoder. "auto" is what `vaetool train` and `vaetool fit-prior` store. Prints one row per density.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--samples", type=int, default=400, help="decoded samples per density")
    parser.add_argument("--components", default="1,2,4,8,16", help="mixture sizes, comma separated")
    parser.add_argument("--second-stage-steps", type=int, default=1500, help="0: no second-stage VAE")
    parser.add_argument("--c2st-steps", type=int, default=300)
    parser.add_argument("--max-images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grids", type=Path, default=None, help="write an 8x8 sample grid per density here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    from vaetool.checkpoint import load_model
    from vaetool.inference.sample_metric import classifier_two_sample_test
    from vaetool.io.batches import iter_batches
    from vaetool.io.find import find_images
    from vaetool.models.prior import fit_mixture
    from vaetool.training.fit_prior import fit_prior, model_prior_level, posterior_means, standard_log_prob

    loaded = load_model(args.checkpoint)
    model, cfg = loaded.model.eval(), loaded.config
    level = model_prior_level(model)
    found = find_images([args.data])[: args.max_images]
    pixels = torch.cat([b for _, b, _ in iter_batches(found, image_size=cfg.image_size, channels=cfg.channels,
                                                      batch_size=64)])  # (N, C, S, S) uint8
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(args.seed))
    n_test = len(pixels) // 5
    test_px, train_px = pixels[order[:n_test]], pixels[order[n_test:]]
    batches = lambda px: (px[i:i + 64] for i in range(0, len(px), 64))  # noqa: E731
    z_train = posterior_means(model, batches(train_px), level=level, device="cpu")
    z_test = posterior_means(model, batches(test_px), level=level, device="cpu")
    real = test_px.float() / 255
    print(f"{loaded.path}: {cfg.kind}, latent {level} {tuple(z_train.shape[1:])}; {len(z_train)} fitting images, "
          f"{len(z_test)} held out; {args.samples} samples per density", flush=True)

    def c2st(images: torch.Tensor) -> float:
        return classifier_two_sample_test(real, images, seed=args.seed, steps=args.c2st_steps).accuracy

    print(f"{'density':<26}{'held-out log-lik':>18}{'fit s':>8}{'C2ST acc':>10}", flush=True)
    rows = Rows()
    rows.add("posterior means (decoded)", float("nan"), 0.0, c2st(_decode(model, level, z_test[: args.samples])))
    draw = lambda: torch.Generator().manual_seed(args.seed + 1)  # noqa: E731  the same draws for every density
    densities: list[tuple[str, object]] = [("N(0, I)", None)]
    densities += [(f"GMM {k}", int(k)) for k in args.components.split(",")]
    densities += [("GMM auto", "auto")]
    for name, kind in densities:
        start = time.perf_counter()
        if kind is None:
            score = float(standard_log_prob(z_test).mean())
            z = torch.randn(args.samples, *z_train.shape[1:], generator=draw())
        else:
            if kind == "auto":
                prior = fit_prior(z_train, level=level, seed=args.seed).prior
                name = f"GMM auto ({prior.components})"
            else:
                prior = fit_mixture(z_train, components=kind, generator=torch.Generator().manual_seed(args.seed),
                                    level=level)
            score = float(prior.log_prob(z_test.double()).mean())
            z = prior.sample(args.samples, generator=draw())
        fit_s = time.perf_counter() - start
        images = _decode(model, level, z)
        rows.add(name, score, fit_s, c2st(images))
        _grid(args.grids, name, images)
    if args.second_stage_steps:
        start = time.perf_counter()
        stage = _second_stage(z_train.flatten(1), steps=args.second_stage_steps, seed=args.seed)
        score = float(stage.iwae(z_test.flatten(1), generator=torch.Generator().manual_seed(args.seed)).mean())
        z = stage.sample(args.samples, generator=draw()).reshape(args.samples, *z_train.shape[1:])
        images = _decode(model, level, z)
        rows.add("second-stage VAE", score, time.perf_counter() - start, c2st(images))
        _grid(args.grids, "second-stage VAE", images)


class Rows:
    """The table, printed a row at a time as each density is scored."""

    def add(self, name: str, score: float, fit_s: float, accuracy: float) -> None:
        print(f"{name:<26}{score:>18.2f}{fit_s:>8.1f}{accuracy:>10.3f}", flush=True)


@torch.no_grad()
def _decode(model, level: str, z: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] for latents of the prior level; a hierarchy's lower levels from its own priors."""
    out = []
    for part in z.split(64):
        if level == "top" and hasattr(model, "top_down"):  # the hierarchical family: ancestral below the top
            size = model.config.image_size
            bottom = (size // model.size_multiple, size // model.size_multiple)
            latents = model.top_down(part, bottom, lambda name, q, p: p.sample(), to_pixels=False).latents
        else:
            latents = {level: part}
        out.append(model.mean_image(model.decode(latents)).clamp(0, 1))
    return torch.cat(out)


def _grid(folder: Path | None, name: str, images: torch.Tensor) -> None:
    if folder is None:
        return
    from vaetool.io.write import save_grid

    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    save_grid(folder / f"{slug}.png", images[:64], nrow=8, force=True)


class _SecondStage(nn.Module):
    """A small MLP VAE over the first stage's latents (Dai & Wipf 2019): its latents u ~ N(0, I) decode to z."""

    def __init__(self, dims: int, hidden: int = 256) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dims, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 2 * dims))
        self.decoder = nn.Sequential(nn.Linear(dims, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, dims))
        self.log_gamma = nn.Parameter(torch.zeros(()))  # one learned decoder std, as Dai & Wipf's gamma
        self.register_buffer("center", torch.zeros(dims))
        self.register_buffer("scale", torch.ones(dims))

    def terms(self, z: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log p(z|u), log N(u; 0, I), log q(u|z) for u = mu + std * eps, eps (K, B, D); in the original z units."""
        x = (z - self.center) / self.scale
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        logvar = logvar.clamp(-12, 6)
        u = mu + (0.5 * logvar).exp() * eps  # (K, B, D)
        recon = self.decoder(u)
        log_px = (-0.5 * ((x - recon) / self.log_gamma.exp()).pow(2) - self.log_gamma
                  - 0.5 * math.log(2 * math.pi)).sum(-1) - self.scale.log().sum()
        log_pu = (-0.5 * u.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_qu = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(-1)
        return log_px, log_pu, log_qu

    @torch.no_grad()
    def iwae(self, z: torch.Tensor, *, generator: torch.Generator, k: int = 64) -> torch.Tensor:
        eps = torch.randn(k, *z.shape, generator=generator)
        log_px, log_pu, log_qu = self.terms(z, eps)
        return torch.logsumexp(log_px + log_pu - log_qu, 0) - math.log(k)  # (B,)

    @torch.no_grad()
    def sample(self, count: int, *, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(count, self.center.shape[0], generator=generator)
        return self.decoder(u) * self.scale + self.center


def _second_stage(z: torch.Tensor, *, steps: int, seed: int) -> _SecondStage:
    """Fit the second-stage VAE by the ELBO with Adam, on standardised latents."""
    torch.manual_seed(seed)
    stage = _SecondStage(z.shape[1])
    stage.center.copy_(z.mean(0))
    stage.scale.copy_(z.std(0).clamp_min(1e-3))
    optimizer = torch.optim.Adam(stage.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = z[torch.randint(len(z), (128,), generator=generator)]
        log_px, log_pu, log_qu = stage.terms(batch, torch.randn(1, *batch.shape, generator=generator))
        loss = -(log_px + log_pu - log_qu).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return stage.eval()


if __name__ == "__main__":
    main()
