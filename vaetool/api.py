"""The Python API: `vaetool.load(path)` returns a `VAEModel` with encode, decode, sample, interpolate, reconstruct."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import DataError
from .inference.latent_ops import decode_images, path_segments, prior_latents
from .inference.load import load_for_inference, model_device
from .events import Failed
from .io.batches import iter_batches
from .io.decode import match_channels
from .io.find import find_images
from .models.base import DiagonalGaussian

ImageInput = torch.Tensor | str | Path | Sequence[str | Path]


class VAEModel:
    """A trained VAE ready for inference. Images are float tensors (B, C, H, W) in [0, 1] on the CPU."""

    def __init__(self, checkpoint: Checkpoint, *, batch_size: int = 64) -> None:
        self.checkpoint = load_for_inference(checkpoint, device=None)
        self.config = checkpoint.config
        self.model = checkpoint.model
        self.device = model_device(checkpoint)
        self.batch_size = batch_size  # rows per forward pass, so a large call needs bounded memory

    @property
    def identity(self) -> str:
        """A short hash of the weights: the identity stored in latents files."""
        return self.checkpoint.identity

    def load_images(self, inputs: str | Path | Sequence[str | Path]) -> torch.Tensor:
        """Files or folders -> (N, C, S, S) float, resized and converted like the training data (decoded on
        worker threads, as the commands do). A file or folder that cannot be read raises DataError."""
        failed: list[Failed] = []
        keep = lambda event: failed.append(event) if isinstance(event, Failed) else None  # noqa: E731
        found = find_images([inputs] if isinstance(inputs, (str, Path)) else list(inputs), callback=keep)
        cfg = self.config
        parts = []
        for _, batch, _ in iter_batches(found, image_size=cfg.image_size, channels=cfg.channels,
                                        batch_size=self.batch_size, callback=keep):
            if failed:
                break
            parts.append(batch)
        if failed:
            raise DataError(f"{failed[0].input}: {failed[0].reason}")
        return torch.cat(parts).float() / 255.0  # (N, C, S, S)

    def _as_batch(self, inputs: ImageInput) -> torch.Tensor:
        """A (B, C, S, S) float batch with the model's channel count (gray <-> RGB converted)."""
        x = inputs if isinstance(inputs, torch.Tensor) else self.load_images(inputs)
        x = x[None] if x.ndim == 3 else x
        size, channels = self.config.image_size, self.config.channels
        if x.ndim != 4 or x.shape[-2:] != (size, size) or x.shape[1] not in (1, 3):
            raise DataError(f"images must be (B, 1 or 3, {size}, {size}) for this model, not {tuple(x.shape)}; "
                            f"pass file paths to have them resized")
        return match_channels(x, channels).float()

    @torch.inference_mode()
    def encode(self, inputs: ImageInput) -> DiagonalGaussian:
        """q(z|x) for images (a tensor, files or folders): `.mu`, `.logvar`, `.sample(generator)`, `.kl()`."""
        x = self._as_batch(inputs)  # (B, C, S, S)
        mus, logvars = [], []
        for start in range(0, len(x), self.batch_size):
            part = x[start:start + self.batch_size].to(self.device).contiguous(memory_format=torch.channels_last)
            posterior = self.model.encode(part)
            mus.append(posterior.mu.float().cpu())
            logvars.append(posterior.logvar.float().cpu())
        return DiagonalGaussian(torch.cat(mus), torch.cat(logvars))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean images (B, C, H, W) for latents (B, D)."""
        z = z if z.ndim == 2 else z[None]
        if z.shape[1] != self.config.latent_dim:
            raise DataError(f"latents are {z.shape[1]}-dimensional; this model's latent_dim is "
                             f"{self.config.latent_dim}")
        return decode_images(self.checkpoint, z, batch_size=self.batch_size)

    def sample(self, n: int = 16, *, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
        """n new images from z ~ N(0, T^2 I); the same seed gives the same images."""
        return self.decode(prior_latents(self.checkpoint, n, temperature=temperature, seed=seed))

    def reconstruct(self, inputs: ImageInput) -> torch.Tensor:
        """Reconstructions from the posterior means."""
        return self.decode(self.encode(inputs).mu)

    def interpolate(self, a: ImageInput, b: ImageInput, *more: ImageInput, steps: int = 8,
                    method: str = "slerp") -> torch.Tensor:
        """Frames along the path through the posterior means of a, b, ...: `steps` per segment, shared
        endpoints once. An anchor may be an image (tensor, file) or a latent vector (D,)."""
        if steps < 2:
            raise DataError(f"steps must be at least 2, not {steps}")
        anchors = torch.stack([self._anchor(x) for x in (a, b, *more)])  # (K, D)
        return self.decode(path_segments(anchors, steps=steps, method=method))

    def _anchor(self, x: ImageInput) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.ndim == 1:
            return x.float().cpu()  # already a latent vector
        return self.encode(x).mu[0]


def load(path: str | Path, *, device: str = "auto", batch_size: int = 64) -> VAEModel:
    """Load a checkpoint file or run folder for inference."""
    return VAEModel(load_for_inference(path, device=device), batch_size=batch_size)
