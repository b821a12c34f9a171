"""The Python API: `vaetool.load(path)` returns a `VAEModel` with encode, decode, sample, interpolate, reconstruct."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import images
from .checkpoint import Checkpoint, load_model
from .latents import lerp, slerp
from .model import DiagonalGaussian
from .ops import decode_images, prepare, prior_latents
from .runtime import resolve_device

ImageInput = torch.Tensor | str | Path | Sequence[str | Path]


class VAEModel:
    """A trained VAE ready for inference. Images are float tensors (B, C, H, W) in [0, 1] on the CPU."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = prepare(checkpoint)
        self.config = checkpoint.config
        self.model = checkpoint.model
        self.device = next(self.model.parameters()).device

    def load_images(self, inputs: str | Path | Sequence[str | Path]) -> torch.Tensor:
        """Files or folders -> (N, C, S, S) float, resized and converted like the training data."""
        found = images.find_images([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
        cfg = self.config
        stack = [images.load_image(f.path, image_size=cfg.image_size, channels=cfg.channels) for f in found]
        return torch.stack(stack).float() / 255.0

    def _as_batch(self, inputs: ImageInput) -> torch.Tensor:
        x = inputs if isinstance(inputs, torch.Tensor) else self.load_images(inputs)
        return x[None] if x.ndim == 3 else x

    @torch.inference_mode()
    def encode(self, inputs: ImageInput) -> DiagonalGaussian:
        """q(z|x) for images (a tensor, files or folders): `.mu`, `.logvar`, `.sample(generator)`, `.kl()`."""
        x = self._as_batch(inputs).to(self.device).contiguous(memory_format=torch.channels_last)
        posterior = self.model.encode(x)
        return DiagonalGaussian(posterior.mu.float().cpu(), posterior.logvar.float().cpu())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean images (B, C, H, W) for latents (B, D)."""
        return decode_images(self.checkpoint, z if z.ndim == 2 else z[None])

    def sample(self, n: int = 16, *, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
        """n new images from z ~ N(0, T^2 I); the same seed gives the same images."""
        return self.decode(prior_latents(self.checkpoint, n, temperature=temperature, seed=seed))

    def reconstruct(self, inputs: ImageInput) -> torch.Tensor:
        """Reconstructions from the posterior means."""
        return self.decode(self.encode(inputs).mu)

    def interpolate(self, a: ImageInput, b: ImageInput, *, steps: int = 8, method: str = "slerp") -> torch.Tensor:
        """`steps` images along the path between the posterior means of a and b (endpoints included)."""
        za, zb = self.encode(a).mu[0], self.encode(b).mu[0]
        t = torch.linspace(0.0, 1.0, steps)
        return self.decode(slerp(za, zb, t) if method == "slerp" else lerp(za, zb, t))


def load(path: str | Path, *, device: str = "auto") -> VAEModel:
    """Load a checkpoint file or run folder for inference."""
    return VAEModel(load_model(path, device=resolve_device(device)))
