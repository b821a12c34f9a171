"""A second-stage VAE as the fitted prior of a latent map (Dai & Wipf 2019), stored beside the weights.

A spatial model's posterior means fill a thin, curved part of its latent-map space. The mixture of
models/prior.py models that map in its top principal directions, which a flat subspace can only
approximate; decoding its samples gives images whose parts do not fit together. A small
convolutional VAE trained on the (per-channel standardised) maps learns the curved set instead: it
maps each map to a short code u and back. Its own codes fill N(0, I) far better than the first
stage's latents do (it is small and sees the maps many times), and a mixture fitted to them by the
same EM closes the rest of the gap. Sampling is u from that mixture, the second stage's decoder,
then the first stage's decoder.

The second stage's output scale gamma is learned (Dai & Wipf's key point): as the reconstruction
sharpens, gamma falls and the KL's weight relative to it with it, so the code keeps what the map
needs. Weights, the standardisation and the code mixture are stored as `prior.<level>.stage2.*`
tensors; a prior over a map applies to maps of the size it was fitted on (the training image size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .prior import FittedPrior

STAGE2 = "stage2"  # the key part after the level: prior.<level>.stage2.<field>
SMALLEST = 4  # the encoder halves the map until its sides are at most this
HIDDEN = 512  # the fully connected layer between the smallest map and the code
DECODE_BATCH = 64  # maps decoded per pass when sampling: bounds memory, never changes a sample


def halvings(height: int, width: int) -> list[tuple[int, int]]:
    """The map sizes the encoder passes through, from (height, width) down to sides of at most SMALLEST."""
    sizes = [(height, width)]
    while max(sizes[-1]) > SMALLEST:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))  # a stride-2 convolution with padding 1
    return sizes


class SecondStageNet(nn.Module):
    """A VAE over maps (C, h, w): stride-2 convolutions to a small map, two linear layers to a code of
    `latent` numbers, and back by nearest-neighbour upsampling to the sizes the encoder passed through."""

    def __init__(self, channels: int, height: int, width: int, *, latent: int = 64, features: int = 64) -> None:
        super().__init__()
        self.latent, self.features = latent, features
        self.sizes = halvings(height, width)
        small = self.sizes[-1][0] * self.sizes[-1][1]
        down = [nn.Conv2d(channels, features, 3, padding=1), nn.SiLU()]
        for _ in self.sizes[1:]:
            down += [nn.Conv2d(features, features, 3, stride=2, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(features * small, HIDDEN), nn.SiLU(),
                                     nn.Linear(HIDDEN, 2 * latent))
        self.start = nn.Sequential(nn.Linear(latent, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, features * small), nn.SiLU())
        self.up = nn.ModuleList(nn.Conv2d(features, features, 3, padding=1) for _ in self.sizes[1:])
        self.head = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(features, channels, 3, padding=1))
        self.log_gamma = nn.Parameter(torch.zeros(()))  # log of the output scale, learned

    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The code's posterior mean and log-variance, (B, latent) each, for maps y (B, C, h, w)."""
        mu, logvar = self.encoder(y).float().chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)  # exp(-12) is far below any code's spread; 8 above a dead unit's 1

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, h, w) for codes u (B, latent)."""
        h, w = self.sizes[-1]
        a = self.start(u).view(len(u), self.features, h, w)
        for conv, size in zip(self.up, reversed(self.sizes[:-1])):
            a = torch.nn.functional.silu(conv(torch.nn.functional.interpolate(a, size=size, mode="nearest")))
        return self.head(a)

    def loss(self, y: torch.Tensor) -> torch.Tensor:
        """The negative ELBO per map, nats: a Gaussian reconstruction of scale gamma, and the code's KL to N(0, I)."""
        mu, logvar = self.encode(y)
        u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        gamma = self.log_gamma.float()
        squared = (y.float() - self.decode(u).float()).pow(2).flatten(1).sum(1)  # (B,)
        numbers = y[0].numel()
        reconstruction = 0.5 * squared * torch.exp(-2 * gamma) + numbers * (gamma + 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (reconstruction + kl).mean()


@dataclass
class SecondStagePrior:
    """A second-stage VAE over one latent level's maps plus a mixture over its codes: the same interface
    as `FittedPrior` (level, shape, sample, to_tensors / from_tensors, describe)."""

    level: str
    shape: tuple[int, ...]  # (C, h, w) of one map
    net: SecondStageNet
    center: torch.Tensor  # (C,) per-channel mean of the maps it was fitted on
    scale: torch.Tensor  # (C,) per-channel standard deviation
    codes: FittedPrior  # the mixture over the second stage's posterior means
    steps: int = 0  # training steps it had

    kind = "second-stage"

    @property
    def components(self) -> int:
        return self.codes.components

    @property
    def held_out(self) -> float:
        return self.codes.held_out

    @torch.no_grad()
    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """First-stage latent maps (N, C, h, w) float32 on the CPU for codes u (N, latent), in batches."""
        net = self.net  # float32 on the CPU, in eval mode: as fit_second_stage and from_tensors leave it
        center, scale = self.center.float().view(1, -1, 1, 1), self.scale.float().view(1, -1, 1, 1)
        maps = [net.decode(u[start: start + DECODE_BATCH].float()) for start in range(0, len(u), DECODE_BATCH)]
        return torch.cat(maps) * scale + center if maps else torch.zeros(0, *self.shape)

    def sample(self, count: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Draw (count, *shape) float32 latents on the CPU; the same generator state gives the same latents.

        Temperature scales the code mixture's spread, as `FittedPrior.sample` does its own.
        """
        return self.decode(self.codes.sample(count, generator=generator, temperature=temperature))

    def to_tensors(self, prefix: str = "prior.") -> dict[str, torch.Tensor]:
        """Named CPU tensors for a safetensors file, keys `{prefix}{level}.stage2.*`; `from_tensors` reverses it."""
        key = f"{prefix}{self.level}.{STAGE2}."
        net = self.net
        tensors = {
            key + "config": torch.tensor([*self.shape, net.latent, net.features, self.steps], dtype=torch.int64),
            key + "center": self.center.float(), key + "scale": self.scale.float(),
        }
        tensors |= {key + "net." + name: t.float() for name, t in net.state_dict().items()}
        tensors |= self.codes.to_tensors(key)  # the code mixture's level is "code": {key}code.*
        return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, prefix: str = "prior.",
                     level: str) -> SecondStagePrior:
        key = f"{prefix}{level}.{STAGE2}."
        get = {name[len(key):]: t for name, t in tensors.items() if name.startswith(key)}
        try:
            channels, height, width, latent, features, steps = (int(v) for v in get["config"].tolist())
            net = SecondStageNet(channels, height, width, latent=latent, features=features)
            net.load_state_dict({name[len("net."):]: t for name, t in get.items() if name.startswith("net.")})
            codes = FittedPrior.from_tensors(tensors, prefix=key, level="code")
            prior = cls(level=level, shape=(channels, height, width), net=net.eval(), center=get["center"],
                        scale=get["scale"], codes=codes, steps=steps)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the second-stage prior for level {level!r} is incomplete or damaged "
                                  f"({str(exc).splitlines()[0][:120]}); run `vaetool fit-prior --second-stage` "
                                  f"again") from None
        if prior.center.shape != (channels,) or prior.scale.shape != (channels,) or codes.shape != (latent,):
            raise CheckpointError(f"the second-stage prior for level {level!r} has inconsistent shapes; "
                                  f"run `vaetool fit-prior --second-stage` again")
        return prior

    def describe(self) -> dict[str, object]:
        """A JSON-able summary, with the fields of `FittedPrior.describe` for its code mixture."""
        return {"kind": self.kind, "level": self.level, "shape": list(self.shape), "components": self.components,
                "reduced_dims": None, "code_size": self.net.latent, "features": self.net.features,
                "steps": self.steps, "held_out_log_likelihood": self.held_out,
                "scores": {str(k): v for k, v in sorted(self.codes.scores.items())}}


def second_stage_levels(tensors: dict[str, torch.Tensor], *, prefix: str = "prior.") -> list[str]:
    """The levels that have a second-stage prior among a checkpoint's tensors."""
    suffix = f".{STAGE2}.config"
    return sorted(name[len(prefix):-len(suffix)] for name in tensors
                  if name.startswith(prefix) and name.endswith(suffix))
