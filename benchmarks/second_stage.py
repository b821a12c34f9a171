"""A second-stage VAE over a spatial model's latent maps (Dai & Wipf 2019) against the fitted mixture, by the
two-sample test. An experiment: the package's fitted prior is the mixture (vaetool/models/prior.py).

    python benchmarks/second_stage.py RUN TRAIN_DIR HELD_OUT_DIR OUT [--seconds 90] [--latent 64] [--width 128]
                                      [--flip] [--from-samples] [--count 200]

Encodes the training images (with --flip, also mirrored) to the spatial model's posterior means, standardises
each channel, and trains a small convolutional VAE on those maps for --seconds (Adam, cosine decay, a learned
output scale gamma as in the two-stage VAE); then fits a mixture (vaetool's `fit_prior`) to its own posterior
means. Scores with `classifier_two_sample_test` against the first --count held-out images, seed 0:

    reconstructions   the spatial model's reconstructions of those held-out images (what no prior can beat)
    stage1-fitted     the run's own fitted prior (the mixture), as `vaetool sample` draws
    standard          N(0, I)
    stage2-T1, -T0.8  the second stage's N(0, I) at temperature 1 and 0.8, decoded twice
    stage2-mixture    the mixture on the second stage's codes, decoded twice
    stage2-recon      held-out maps through the second stage and the decoder (its own ceiling)

Writes OUT/NAME.png grids (64 images each) and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

import vaetool.api as api
from vaetool.inference.sample_metric import classifier_two_sample_test
from vaetool.runtime import autocast, resolve_precision
from vaetool.training.fit_prior import fit_prior


class SecondStageVAE(nn.Module):
    """Maps (C, s, s) -> a vector code (stride-2 convs to 4x4, two linear layers) and back (nearest + conv)."""

    def __init__(self, channels: int, side: int, latent: int, width: int) -> None:
        super().__init__()
        layers, s = [nn.Conv2d(channels, width, 3, 1, 1), nn.SiLU()], side
        while s > 4:
            layers += [nn.Conv2d(width, width, 3, 2, 1), nn.SiLU()]
            s //= 2
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * s * s, 512), nn.SiLU(),
                                     nn.Linear(512, 2 * latent))
        self.small, self.width = s, width
        up = []
        while s < side:
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, 1, 1), nn.SiLU()]
            s *= 2
        self.start = nn.Sequential(nn.Linear(latent, 512), nn.SiLU(), nn.Linear(512, width * self.small**2), nn.SiLU())
        self.decoder = nn.Sequential(*up, nn.Conv2d(width, width, 3, 1, 1), nn.SiLU(), nn.Conv2d(width, channels, 3, 1, 1))
        self.log_gamma = nn.Parameter(torch.zeros(()))  # the output scale, learned: it falls as the fit sharpens

    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(y).chunk(2, 1)
        return mu, logvar.clamp(-12, 8)

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.start(u).view(len(u), self.width, self.small, self.small))

    def loss(self, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO per map, nats: Gaussian reconstruction with scale gamma, KL to N(0, I)."""
        mu, logvar = self.encode(y)
        u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        d = y[0].numel()
        rec = ((y - self.decode(u)) ** 2).flatten(1).sum(1) / (2 * self.log_gamma.exp() ** 2) \
            + d * (self.log_gamma + 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        return (rec + kl).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run"); p.add_argument("train"); p.add_argument("held_out"); p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--flip", action="store_true", help="also the mirrored training images (not for digits)")
    p.add_argument("--from-samples", action="store_true", help="train on draws from q(z|x), not its means")
    p.add_argument("--count", type=int, default=200)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = api.load(a.run, device="cpu")
    train = model.load_images(a.train)
    held = model.load_images(a.held_out)[: a.count]
    q = model.encode(torch.cat([train, train.flip(-1)]) if a.flip else train).levels["z"]
    if q.mu.ndim != 4:
        raise SystemExit("the second stage here is for spatial models (a latent map)")
    center, scale = q.mu.mean((0, 2, 3), keepdim=True), q.mu.std((0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    y_mu, y_std = (q.mu - center) / scale, (0.5 * q.logvar).exp() / scale
    results: dict[str, float] = {}

    def score(name: str, images: torch.Tensor) -> None:
        save_image(images[:64], a.out / f"{name}.png", nrow=8)
        results[name] = round(classifier_two_sample_test(held, images[: a.count].clamp(0, 1), seed=0).accuracy, 4)
        print(f"{name:16s} two-sample accuracy {results[name]:.3f}", flush=True)

    def decode_maps(y: torch.Tensor) -> torch.Tensor:
        return model.decode(y * scale + center)

    score("reconstructions", model.reconstruct(held))
    score("stage1-fitted", model.sample(a.count, prior="fitted", seed=0))
    score("standard", model.sample(a.count, prior="standard", seed=0))
    net = SecondStageVAE(q.mu.shape[1], q.mu.shape[-1], a.latent, a.width).to(memory_format=torch.channels_last)
    amp = resolve_precision("auto", torch.device("cpu"), training=True)  # bf16 where the CPU has it, as train runs
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator, start, steps = torch.Generator().manual_seed(0), time.time(), 0
    while (elapsed := time.time() - start) < a.seconds:
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * elapsed / a.seconds))
        rows = torch.randint(0, len(y_mu), (128,), generator=generator)
        y = y_mu[rows] + (y_std[rows] * torch.randn(y_mu[rows].shape, generator=generator) if a.from_samples else 0)
        with autocast(torch.device("cpu"), amp):
            loss = net.loss(y.contiguous(memory_format=torch.channels_last))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 100)
        optimizer.step()
        steps += 1
        if steps % 200 == 0:
            print(f"step {steps} loss {loss.item():.1f} gamma {net.log_gamma.exp().item():.4f}", flush=True)
    net.eval().float()
    with torch.no_grad():
        draws = torch.Generator().manual_seed(1)
        for t in (1.0, 0.8):
            score(f"stage2-T{t:g}", decode_maps(net.decode(torch.randn(a.count, a.latent, generator=draws) * t)))
        fit = fit_prior(net.encode(y_mu)[0], level="u", seed=0)
        print(fit.message(), flush=True)
        score("stage2-mixture", decode_maps(net.decode(fit.prior.sample(a.count, generator=torch.Generator().manual_seed(2)))))
        held_maps = (model.encode(held).levels["z"].mu - center) / scale
        score("stage2-recon", decode_maps(net.decode(net.encode(held_maps)[0])))
    results["steps"] = steps
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
