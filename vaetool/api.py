"""The Python API: `vaetool.load(path)` returns a `VAEModel` with encode, decode, sample, interpolate, reconstruct,
for every model family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import DataError
from .events import Failed
from .inference.latent_ops import as_level_dict, decode_images
from .inference.latent_space import (fit_levels, interpolate_latents, level_names, posterior_levels,
                                     sample_latents)
from .inference.load import load_for_inference, model_device
from .io.batches import iter_batches
from .io.decode import match_channels
from .io.find import find_images
from .models.base import DiagonalGaussian, Latents, MainLevelView

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
        """A (B, C, H, W) float batch with the model's channel count (gray <-> RGB converted); a family
        that takes any size (spatial, hierarchical) takes any H, W its factor divides."""
        x = inputs if isinstance(inputs, torch.Tensor) else self.load_images(inputs)
        x = x[None] if x.ndim == 3 else x
        size, channels = self.config.image_size, self.config.channels
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"images must be (B, 1 or 3, {size}, {size}) for this model, not {tuple(x.shape)}; "
                            f"pass file paths to have them resized")
        if self.model.size_multiple is None and x.shape[-2:] != (size, size):
            raise DataError(f"images must be (B, 1 or 3, {size}, {size}) for this model, not {tuple(x.shape)}; "
                            f"pass file paths to have them resized")
        self.model.check_size(*x.shape[-2:])
        return match_channels(x, channels).float()

    @torch.inference_mode()
    def encode(self, inputs: ImageInput) -> Encoding:
        """q(z|x) for images (a tensor, files or folders), every level's Gaussian on the CPU: `.levels`,
        `.mode()`, `.kl()`, and for one-level or vector-topped families `.mu`, `.logvar`, `.sample(generator)`."""
        x = self._as_batch(inputs)  # (B, C, H, W)
        parts = []
        for start in range(0, len(x), self.batch_size):
            part = x[start:start + self.batch_size].to(self.device).contiguous(memory_format=torch.channels_last)
            found = posterior_levels(self.model.encode(part))
            parts.append(({n: DiagonalGaussian(q.mu.float().cpu(), q.logvar.float().cpu())
                           for n, q in found.levels.items()}, {n: kl.float().cpu() for n, kl in found.kl.items()}))
        levels = {n: DiagonalGaussian(torch.cat([p[0][n].mu for p in parts]), torch.cat([p[0][n].logvar for p in parts]))
                  for n in parts[0][0]}
        return Encoding(levels, {n: torch.cat([p[1][n] for p in parts]) for n in parts[0][1]},
                        vector_level=self.model.vector_level)

    def decode(self, z: torch.Tensor | Latents) -> torch.Tensor:
        """Mean images (B, C, H, W) for latents: a dict of levels (B, ...), or a one-level family's tensor
        (a vector model's (B, D) or (D,))."""
        if isinstance(z, torch.Tensor):
            names = level_names(self.model)
            if len(names) == 1 and z.ndim == len(self.model.latent_shapes(*(self.config.image_size,) * 2)[names[0]]):
                z = z[None]  # one latent without the batch
            z = as_level_dict(self.checkpoint, z)
        fit_levels(self.model, z, "latents")
        return decode_images(self.checkpoint, z, batch_size=self.batch_size)

    def sample(self, n: int = 16, *, temperature: float | dict[str, float] = 1.0, seed: int = 0,
               prior: str = "auto", size: tuple[int, int] | None = None) -> torch.Tensor:
        """n new images from the prior (ancestral for a hierarchy; `temperature` a float or {level: T});
        `prior` "auto" uses a fitted prior when the checkpoint has one. The same seed gives the same images."""
        latents = sample_latents(self.checkpoint, n, temperature=temperature, seed=seed, size=size, prior=prior,
                                 batch_size=self.batch_size)
        return self.decode(latents)

    def reconstruct(self, inputs: ImageInput) -> torch.Tensor:
        """Reconstructions from the posterior means (in a hierarchy, level by level)."""
        return self.decode(self.encode(inputs).mode())

    def interpolate(self, a: ImageInput, b: ImageInput, *more: ImageInput, steps: int = 8,
                    method: str = "slerp", levels: str = "all", temperature: float = 0.0,
                    seed: int = 0) -> torch.Tensor:
        """Frames along the path through the posterior means of a, b, ...: `steps` per segment, shared
        endpoints once, every level walked with the same t (`levels="top"`: a hierarchy's top only, the
        levels below from their conditional priors at `temperature`). An anchor may be an image (tensor,
        file), a vector model's latent (D,), or a dict of levels (each without the batch)."""
        if steps < 2:
            raise DataError(f"steps must be at least 2, not {steps}")
        rows = [self._anchor(x) for x in (a, b, *more)]
        anchors = {name: torch.cat([r[name] for r in rows]) for name in rows[0]}  # level -> (K, ...)
        fit_levels(self.model, anchors, "anchors")
        frames = interpolate_latents(self.checkpoint, anchors, steps=steps, method=method, levels=levels,
                                     temperature=temperature, seed=seed)
        return self.decode(frames)

    def _anchor(self, x: ImageInput | Latents) -> Latents:
        if isinstance(x, dict):
            return {name: value.float().cpu()[None] for name, value in x.items()}
        if isinstance(x, torch.Tensor) and x.ndim == 1:
            return as_level_dict(self.checkpoint, x.float().cpu()[None])  # already a latent vector
        return {name: value[:1] for name, value in self.encode(x).mode().items()}


    def denoise(self, images: torch.Tensor | str | Path, *, samples: int = 0, seed: int = 0, tile: str | int = "auto",
                strength: float = 1.0, wiener: bool | None = None, sigma: float | None = None,
                block_matching: bool = True, mirror: bool | None = None) -> torch.Tensor:
        """Denoised images as `vaetool denoise` makes them: a (C, H, W) or (B, C, H, W) float tensor in [0, 1]
        of any size (a vector model works in blended tiles, the others whole), or an image file at its own
        size. `samples` K > 0 averages K posterior samples (the MMSE estimate of a noise-model run);
        `wiener`, `sigma` (0-1 scale), `block_matching` and `mirror` as `vaetool denoise --wiener --sigma
        --block-matching --mirror`."""
        from .inference.denoise import mirror_by_default
        from .inference.tiledenoise import denoise_image
        from .inference.wiener import choose_wiener
        from .io.decode import read_image

        x = read_image(images).pixels if isinstance(images, (str, Path)) else images
        batch = x[None] if x.ndim == 3 else x
        train_config = self.checkpoint.train_config
        step = choose_wiener(wiener, sigma, self.config, train_config.corruptions if train_config else (),
                             matching=block_matching)
        out = torch.stack([denoise_image(self.model, image, tile=tile, strength=strength, batch_size=self.batch_size,
                                         samples=samples, seed=seed, wiener=step,
                                         mirror=mirror_by_default(train_config) if mirror is None else mirror)
                           for image in batch])
        return out[0] if x.ndim == 3 else out

    def eval(self, inputs: ImageInput, *, iw_samples: int = 100, seed: int = 0, samples: int = 0) -> dict:
        """`vaetool eval`'s figures for images (files, folders or a tensor): -ELBO, IWAE NLL, bits/dim, PSNR,
        SSIM, active units, per level; with `samples` N, the two-sample test of N prior samples."""
        from .inference.evaluate import evaluate

        data = inputs if isinstance(inputs, torch.Tensor) else ([inputs] if isinstance(inputs, (str, Path))
                                                                 else list(inputs))
        return evaluate(self.checkpoint, data, iw_samples=iw_samples, batch_size=self.batch_size, seed=seed,
                        device=str(self.device), samples=samples).to_dict()


class Encoding(MainLevelView):
    """q(z|x) for a batch, level by level, on the CPU (in a hierarchy each level given the means above).

    `.mu`, `.logvar`, `.std` and `.sample(generator)` are the one level's of a one-level family, else the
    vector level's (a hierarchy's top), so code written for the vector family keeps working.
    """

    def __init__(self, levels: dict[str, DiagonalGaussian], kl: dict[str, torch.Tensor], *,
                 vector_level: str | None) -> None:
        self.levels = levels  # level -> Gaussian over (B, ...)
        self.kl_levels = kl  # level -> (B,) KL to its prior, nats
        self.vector_level = vector_level

    def main_level(self) -> DiagonalGaussian:
        if len(self.levels) == 1:
            return next(iter(self.levels.values()))
        if self.vector_level is None:
            raise DataError(f"these latents have the levels {', '.join(self.levels)}; use .levels or .mode()")
        return self.levels[self.vector_level]

    def mode(self) -> Latents:
        """Every level's means: what `VAEModel.decode` turns into the reconstructions."""
        return {name: q.mu for name, q in self.levels.items()}

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ q of the one level (or the vector level); `sample_levels` draws every level."""
        return self.main_level().sample(generator)

    def sample_levels(self, generator: torch.Generator | None = None) -> Latents:
        """Each level drawn from its Gaussian (in a hierarchy, the conditionals at the means above)."""
        return {name: q.sample(generator) for name, q in self.levels.items()}

    def kl(self) -> torch.Tensor:
        """The KL of every level to its prior, summed, (B,) nats."""
        return sum(self.kl_levels.values())


def load(path: str | Path, *, device: str = "auto", batch_size: int = 64) -> VAEModel:
    """Load a checkpoint file or run folder for inference."""
    return VAEModel(load_for_inference(path, device=device), batch_size=batch_size)


def save_images(images: torch.Tensor, target: str | Path | Sequence[str | Path], *, prefix: str = "image_",
                ext: str = "png", force: bool = False) -> list[Path]:
    """Write (B, C, H, W) (or one (C, H, W)) float images in [0, 1] atomically: into the folder `target` as
    PREFIX00000.EXT..., or to the given paths (the format from each extension). Refuses to overwrite
    without `force`."""
    from .io.write import write_image

    batch = images[None] if images.ndim == 3 else images
    if isinstance(target, (str, Path)):
        paths = [Path(target) / f"{prefix}{i:05d}.{ext.lstrip('.')}" for i in range(len(batch))]
    else:
        paths = [Path(p) for p in target]
    if len(paths) != len(batch):
        raise DataError(f"{len(batch)} images but {len(paths)} paths")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    return [write_image(path, image.float().cpu(), force=force) for path, image in zip(paths, batch)]
