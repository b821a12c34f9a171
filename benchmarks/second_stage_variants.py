"""Variants of the second-stage prior at equal time on one spatial run, by the two-sample test, averaged over
three sample seeds; for finding what holds its samples back at the 3-minute budget.

    python benchmarks/second_stage_variants.py RUN TRAIN_DIR HELD_OUT_DIR OUT [--seconds 60]
                                               [--variants means,samples,flip,channel-scale,posterior-scale,optimal]
                                               [--batch 64] [--lr 2e-3]

Each variant trains a second stage for --seconds on the run's training maps as vaetool/training/second_stage.py
does (the same net, Adam, cosine decay, bf16 where training uses it; --batch and --lr default to the package's),
changed in one way:

    means             the package's: posterior means, one learned output scale
    samples           a fresh draw z ~ q(z | x) for each batch instead of the posterior means
    flip              the mirrored training images' maps added
    channel-scale     one learned output scale per map channel
    posterior-scale   channels standardised by their mean posterior standard deviation instead of the means'
                      spread (errors weighted by what the first stage's decoder can tell apart)
    optimal           the output scale set to its optimum, the batch's RMSE, at every step (as the first stage's
                      `--decoder-scale optimal`) instead of learned

Then, for the `optimal` net, the code density: mixtures of 1, 4, 16 and 64 components, and the codes' aggregate
posterior itself (a training image's code mean plus its posterior noise), which no density fitted to the codes
can beat. Scores: `classifier_two_sample_test` of the first 200 held-out images against 200 samples, classifier
seed 0, sample seeds 100-102; their mean. Writes OUT/NAME.png (64 samples) and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

import vaetool.api as api
from vaetool.inference.sample_metric import classifier_two_sample_test
from vaetool.models.second_stage import SecondStageNet, SecondStagePrior
from vaetool.runtime import autocast, resolve_precision
from vaetool.training.fit_prior import fit_prior
from vaetool.training.second_stage import BATCH, CLIP, LEARNING_RATE

CPU = torch.device("cpu")
SEEDS = (100, 101, 102)


class ChannelScaleNet(SecondStageNet):
    """One learned output scale per channel of the map."""

    def __init__(self, channels: int, height: int, width: int, **kwargs) -> None:
        super().__init__(channels, height, width, **kwargs)
        self.log_gamma = torch.nn.Parameter(torch.zeros(channels))

    def loss(self, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encode(y)
        u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        gamma = self.log_gamma.float().view(1, -1, 1, 1)
        squared = (y.float() - self.decode(u).float()).pow(2)
        reconstruction = (0.5 * squared * torch.exp(-2 * gamma) + gamma + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (reconstruction + kl).mean()


class OptimalScaleNet(SecondStageNet):
    """The output scale at the batch's optimum (its RMSE) at every step; stored in log_gamma for sampling."""

    def loss(self, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encode(y)
        u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        squared = (y.float() - self.decode(u).float()).pow(2).flatten(1).sum(1)
        numbers = y[0].numel()
        mse = squared.mean().detach() / numbers
        with torch.no_grad():
            self.log_gamma.copy_(0.5 * mse.log())
        reconstruction = 0.5 * squared / mse + numbers * (0.5 * mse.log() + 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (reconstruction + kl).mean()


def train(mu: torch.Tensor, std: torch.Tensor, *, seconds: float, amp, batch: int, lr: float,
          net_class=SecondStageNet, sample: bool = False, posterior_scale: bool = False, seed: int = 0) -> tuple[SecondStagePrior, torch.Tensor]:
    """A second stage on maps (N, C, h, w) for `seconds`; returns the prior and the codes' (mean, log-variance)."""
    center = mu.mean((0, 2, 3))
    scale = std.pow(2).mean((0, 2, 3)).sqrt() if posterior_scale else mu.std((0, 2, 3)).clamp_min(1e-6)
    standard_mu = (mu - center.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)
    standard_std = std / scale.view(1, -1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = net_class(*mu.shape[1:]).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    started, steps = time.monotonic(), 0
    while (done := (time.monotonic() - started) / seconds) < 1:
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * done))
        rows = torch.randint(0, len(mu), (batch,), generator=generator)
        y = standard_mu[rows]
        if sample:
            y = y + standard_std[rows] * torch.randn(y.shape, generator=generator)
        with autocast(CPU, amp):
            loss = net.loss(y.contiguous(memory_format=torch.channels_last))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        optimizer.step()
        steps += 1
    net = net.float().eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        code_mu, code_logvar = (torch.cat(parts) for parts in
                                zip(*(net.encode(standard_mu[i: i + 256]) for i in range(0, len(mu), 256))))
    codes = fit_prior(code_mu, level="code", seed=seed).prior
    prior = SecondStagePrior(level="z", shape=tuple(mu.shape[1:]), net=net, center=center, scale=scale, codes=codes,
                             steps=steps)
    return prior, torch.stack([code_mu, code_logvar])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run"); p.add_argument("train"); p.add_argument("held_out"); p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--variants", default="means,samples,flip,channel-scale,posterior-scale,optimal")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = api.load(a.run, device="cpu")
    train_images = model.load_images(a.train)
    held = model.load_images(a.held_out)[:200]
    amp = resolve_precision("auto", CPU, training=True)
    results: dict[str, object] = {}

    def posterior(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        level = model.encode(images).levels["z"]
        return level.mu.float(), (0.5 * level.logvar.float()).exp()

    def score(name: str, prior: SecondStagePrior, codes) -> None:
        accuracies = []
        for seed in SEEDS:
            images = model.decode({"z": prior.decode(codes(seed))}).clamp(0, 1)
            if seed == SEEDS[0]:
                save_image(images[:64], a.out / f"{name}.png", nrow=8)
            accuracies.append(round(classifier_two_sample_test(held, images, seed=0).accuracy, 4))
        results[name] = {"accuracy": accuracies, "mean": round(sum(accuracies) / len(accuracies), 4),
                         "steps": prior.steps, "output_scale": round(float(prior.net.log_gamma.detach().exp().mean()), 3)}
        print(f"{name:18s} {results[name]}", flush=True)
        (a.out / "results.json").write_text(json.dumps(results, indent=1))

    def from_mixture(prior: SecondStagePrior):
        return lambda seed: prior.codes.sample(200, generator=torch.Generator().manual_seed(seed))

    mu, std = posterior(train_images)
    options = {"means": {}, "samples": {"sample": True}, "channel-scale": {"net_class": ChannelScaleNet},
               "posterior-scale": {"posterior_scale": True}, "optimal": {"net_class": OptimalScaleNet}}
    codes = None
    for variant in a.variants.split(","):
        maps, spread = mu, std
        if variant == "flip":
            mirrored = posterior(train_images.flip(-1))
            maps, spread = torch.cat([mu, mirrored[0]]), torch.cat([std, mirrored[1]])
        prior, variant_codes = train(maps, spread, seconds=a.seconds, amp=amp, batch=a.batch, lr=a.lr,
                                     **options.get(variant, {}))
        score(variant, prior, from_mixture(prior))
        if variant == "optimal":
            optimal, codes = prior, variant_codes
    if codes is None:
        return
    code_mu, code_logvar = codes
    for components in (1, 4, 16, 64):
        mixture = fit_prior(code_mu, level="code", components=components, seed=0).prior
        with_mixture = SecondStagePrior(**{**optimal.__dict__, "codes": mixture})
        score(f"optimal, {components} comp.", with_mixture, from_mixture(with_mixture))

    def aggregate(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, len(code_mu), (200,), generator=generator)
        return code_mu[rows] + (0.5 * code_logvar[rows]).exp() * torch.randn(200, code_mu.shape[1], generator=generator)

    score("optimal, aggregate", optimal, aggregate)


if __name__ == "__main__":
    main()
