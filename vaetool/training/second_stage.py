"""Training a second-stage prior (models/second_stage.py) on a spatial model's posterior-mean maps.

The maps are standardised per channel, the second stage trains on them (Adam, cosine decay to zero
over its budget, bf16 autocast where training uses it), and the mixture of training/fit_prior.py is
fitted to its codes. A budget in steps gives the same prior for the same seed; a budget in seconds
(the end of `train --time`) as many steps as fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from ..events import Callback, Note, Progress, ignore
from ..models.second_stage import SecondStageNet, SecondStagePrior
from ..runtime import autocast
from .fit_prior import MIN_LATENTS, fit_prior

# fit-prior's default budget: about the 90 s in bf16 on the AMX machine that 2,000 steps of batch 128 took when
# they gave the faces' 0.575-0.580 two-sample scores (BENCHMARKS.md); batch 64 makes 1.7x the steps per second.
STEPS = 3400
# A third of a 3-minute run is too short for the second stage to learn its maps at batch 128 and 1e-3: batch 64
# with 2e-3 fits them far better in the same time (-ELBO -116 against +1,003 nats per map; samples 0.62 against
# 0.70 by one classifier seed, level end to end over three: BENCHMARKS.md, "What holds the 3-minute faces'
# samples back").
BATCH = 64
LEARNING_RATE = 2e-3
CLIP = 100.0  # a guard against a wild first batch, not a regulariser: it rarely bites
CODE = 64  # numbers in the second stage's code
FEATURES = 64  # channels of its convolutions: at equal time, more steps of a narrower net sampled better
PROGRESS_EVERY = 100


@dataclass(frozen=True)
class SecondStageFit:
    """A trained second-stage prior and what its training did."""

    prior: SecondStagePrior
    latents: int  # maps it was trained on
    loss: float  # the mean negative ELBO per map over the last steps, nats
    seconds: float

    def describe(self) -> dict[str, object]:
        return self.prior.describe() | {"latents": self.latents, "loss": self.loss, "seconds": round(self.seconds, 1)}

    def message(self) -> str:
        p = self.prior
        gamma = math.exp(float(p.net.log_gamma.detach()))
        return (f"second-stage prior on latent {p.level} {tuple(p.shape)}: {p.steps} steps in {self.seconds:.0f} s on "
                f"{self.latents} maps (loss {self.loss:.1f} nats per map, output scale {gamma:.3f}), a mixture of "
                f"{p.components} component(s) over its {p.net.latent}-number codes")


def fit_second_stage(maps: torch.Tensor, *, level: str, steps: int | None = STEPS, seconds: float | None = None,
                     seed: int = 0, device: torch.device | str = "cpu", amp: torch.dtype | None = None,
                     code: int = CODE, features: int = FEATURES, batch: int = BATCH,
                     emit: Callback = ignore) -> SecondStageFit:
    """Train a second stage on posterior-mean maps (N, C, h, w) for `steps` (or until `seconds` pass, when given)
    and fit a mixture to its codes. The same seed and step budget give the same prior on the same machine."""
    if maps.ndim != 4:
        raise ConfigError(f"a second-stage prior is for latent maps (C, h, w), not latents of shape "
                          f"{tuple(maps.shape[1:])}; the mixture (the default) models a vector latent")
    if len(maps) < MIN_LATENTS:
        raise DataError(f"a second-stage prior needs the maps of at least {MIN_LATENTS} images, got {len(maps)}; "
                        f"give more images")
    if steps is None and seconds is None:
        raise ConfigError("give the second stage a budget: steps or seconds")
    device = torch.device(device)
    maps = maps.detach().float().cpu()
    center, scale = maps.mean((0, 2, 3)), maps.std((0, 2, 3)).clamp_min(1e-6)  # (C,) each
    standard = ((maps - center.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)).to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the weights' initialisation and the codes' noise
        net = SecondStageNet(*maps.shape[1:], latent=code, features=features).to(device)
        net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        started, step, window, last = time.monotonic(), 0, [], float("nan")
        while True:
            elapsed = time.monotonic() - started
            done = max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)  # of the budget
            if done >= 1.0:
                break
            for group in optimizer.param_groups:  # cosine decay over the budget's elapsed fraction
                group["lr"] = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * done))
            rows = torch.randint(0, len(standard), (min(batch, len(standard)),), generator=generator).to(device)
            with autocast(device, amp):
                loss = net.loss(standard[rows].contiguous(memory_format=torch.channels_last))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            optimizer.step()
            step += 1
            window.append(loss.detach())  # read back every PROGRESS_EVERY steps: no device sync per step
            if len(window) == PROGRESS_EVERY:
                last, window = _mean_loss(window, step), []
                emit(Progress(step, steps, {"loss": last, "budget": done}))
        if window:
            last = _mean_loss(window, step)
    net = net.float().eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        codes = torch.cat([net.encode(standard[start: start + batch])[0].cpu()
                           for start in range(0, len(standard), batch)])
    mixture = fit_prior(codes, level="code", seed=seed).prior
    prior = SecondStagePrior(level=level, shape=tuple(maps.shape[1:]), net=net.cpu(), center=center, scale=scale,
                             codes=mixture, steps=step)
    fit = SecondStageFit(prior, len(maps), last, time.monotonic() - started)
    emit(Note(fit.message()))
    return fit


def _mean_loss(window: list[torch.Tensor], step: int) -> float:
    """The mean of the recent losses; a non-finite one stops the fit with a message."""
    mean = float(torch.stack(window).mean())
    if not math.isfinite(mean):
        raise DataError(f"the second stage's loss became {mean} by step {step}; the maps may be damaged, "
                        f"or fit with fewer steps")
    return mean
