"""The peers a user would reach for instead, trained at the same wall time as vaetool's runs in families.py.

- `baseline`: a plain pytorch/examples-style loop (a conv VAE with a linear 64-number bottleneck, MSE + KL, Adam).
- `pythae`: pythae's `VAE` with the networks its quick start gets by default (an MLP encoder and decoder).
- `pythae-celeba`: pythae's `VAE` with its convolutional benchmark networks for 64x64 CelebA
  (`Encoder_Conv_VAE_CELEBA`, `Decoder_Conv_AE_CELEBA`).

pythae's models, losses, networks and samplers are its own, with the defaults of its trainer (Adam, learning rate
1e-4, batch 64); a loop of ours steps them, because pythae's `TrainingPipeline` counts epochs and the comparison is at
equal wall time. Samples come from its `NormalSampler` (N(0, I)) and its `GaussianMixtureSampler` (10 components
fitted to the training images' latents, pythae's answer to a fitted prior). Every peer is measured with vaetool's own
metric functions and two-sample test on the same held-out images. `pip install pythae` (a benchmark dependency only).
"""

from __future__ import annotations

import time
from pathlib import Path

GRID_IMAGES = 16


# ------------------------------------------------------------------------------ the plain loop


def _load_images(folder: Path, channels: int):
    """Every PNG under `folder` as one uint8 tensor (N, C, H, W), sorted by path."""
    import numpy as np
    import torch
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(p).convert(mode)) for p in sorted(folder.rglob("*.png"))]
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, C)
    return torch.from_numpy(stacked.reshape(*stacked.shape[:3], channels)).permute(0, 3, 1, 2).contiguous()


def _baseline_model(channels: int, size: int, latent: int = 64):
    """pytorch/examples' VAE with conv layers: four stride-2 convs, a linear bottleneck, the mirror back up."""
    import torch
    from torch import nn

    class ConvVAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths, self.side = (32, 64, 128, 256), size // 16
            layers, c = [], channels
            for w in widths:
                layers += [nn.Conv2d(c, w, 4, 2, 1), nn.ReLU()]
                c = w
            self.encoder = nn.Sequential(*layers, nn.Flatten())
            flat = widths[-1] * self.side * self.side
            self.mu, self.logvar = nn.Linear(flat, latent), nn.Linear(flat, latent)
            self.expand = nn.Linear(latent, flat)
            layers = []
            for w_in, w_out in zip(widths[::-1], [*widths[-2::-1], channels]):
                layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.ReLU()]
            self.decoder = nn.Sequential(*layers[:-1], nn.Sigmoid())

        def encode(self, x):
            h = self.encoder(x)  # (B, 256 * side * side)
            return self.mu(h), self.logvar(h)

        def decode(self, z):
            return self.decoder(self.expand(z).view(z.shape[0], -1, self.side, self.side))  # (B, C, H, W)

    torch.manual_seed(0)
    return ConvVAE()


def _train_for(seconds: float, train, batch_size: int, generator, loss_of, optimizer) -> tuple[int, float]:
    """Optimizer steps on shuffled batches of the uint8 images until `seconds` of wall time have passed: (steps, s)."""
    import torch

    steps, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        for index in torch.randperm(len(train), generator=generator).split(batch_size):
            loss = loss_of(train[index].float() / 255.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.monotonic() - started >= seconds:
                break
    return steps, time.monotonic() - started


def _save_grid(path: Path, images, nrow: int) -> None:
    """(N, C, H, W) floats in [0, 1] as one PNG grid with 2-pixel gaps."""
    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    sheet = np.full((rows * (h + 2), nrow * (w + 2), c), 255, np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i, image in enumerate(pixels):
        r, k = divmod(i, nrow)
        sheet[r * (h + 2):r * (h + 2) + h, k * (w + 2):k * (w + 2) + w] = image
    Image.fromarray(sheet.squeeze(-1) if c == 1 else sheet).save(path)


def baseline_run(folder: Path, run: Path, *, seconds: float, channels: int, batch_size: int = 64,
                 sample_metric: int = 0) -> dict:
    """Train the plain loop (MSE summed + KL, Adam 1e-3) for `seconds` of wall time; PSNR/SSIM on the held-out set,
    and with `sample_metric` N, the two-sample test of N prior samples against the held-out images, the same test
    (`vaetool.inference.sample_metric`, same seed and setup) that `vaetool eval --samples N` runs."""
    import torch
    import torch.nn.functional as F

    from vaetool.inference.evaluate import psnr, ssim  # the same definitions as `vaetool eval`

    train, test = _load_images(folder / "train", channels), _load_images(folder / "test", channels)
    model = _baseline_model(channels, train.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def loss_of(x):  # x: (B, C, H, W) in [0, 1]
        mu, logvar = model.encode(x)
        z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return F.mse_loss(model.decode(z), x, reduction="sum") + kl

    steps, elapsed = _train_for(seconds, train, batch_size, generator, loss_of, optimizer)
    with torch.inference_mode():
        x = test.float() / 255.0
        recon = torch.cat([model.decode(model.encode(b)[0]) for b in x.split(100)])  # posterior means
        _save_grid(run / "heldout_reconstructions.png", torch.cat([x[:GRID_IMAGES], recon[:GRID_IMAGES]]), GRID_IMAGES)
        _save_grid(run / "prior_samples.png", model.decode(torch.randn(64, 64, generator=generator)), 8)
        metrics = {"psnr": psnr(recon, x).mean().item(), "ssim": ssim(recon, x).mean().item()}
        two_sample = None
        if sample_metric:
            from vaetool.inference.sample_metric import classifier_two_sample_test

            drawn = torch.cat([model.decode(z) for z in torch.randn(sample_metric, 64, generator=generator).split(100)])
            two_sample = {"samples": {"two_sample": classifier_two_sample_test(x, drawn, seed=0).to_dict()}}
    return {"family": "baseline", "label": "plain loop (pytorch/examples)", "steps": steps,
            "train_s": round(elapsed, 1), "images_per_s": steps * batch_size / elapsed, "test": metrics,
            "sample_metric": two_sample,
            "grids": {"samples": str(run / "prior_samples.png"),
                      "reconstructions": str(run / "heldout_reconstructions.png")}}


# ------------------------------------------------------------------------------------- pythae


def _pythae_model(variant: str, channels: int, size: int):
    """pythae's VAE (latent 64, MSE) with its default MLP networks or its CelebA conv networks."""
    import torch
    from pythae.models import VAE, VAEConfig

    config = VAEConfig(input_dim=(channels, size, size), latent_dim=64)
    torch.manual_seed(0)
    if variant == "pythae":
        return VAE(model_config=config)
    if (channels, size) != (3, 64):
        raise RuntimeError(f"pythae's CelebA networks take 64x64 colour images, not {channels}x{size}x{size}")
    from pythae.models.nn.benchmarks.celeba import Decoder_Conv_AE_CELEBA, Encoder_Conv_VAE_CELEBA

    return VAE(model_config=config, encoder=Encoder_Conv_VAE_CELEBA(config), decoder=Decoder_Conv_AE_CELEBA(config))


def pythae_run(folder: Path, run: Path, *, seconds: float, channels: int, variant: str = "pythae",
               batch_size: int = 64, sample_metric: int = 0) -> dict:
    """Train pythae's VAE for `seconds` of wall time; measure it as `baseline_run` measures the plain loop."""
    import torch
    from pythae.samplers import GaussianMixtureSampler, NormalSampler

    from vaetool.inference.evaluate import psnr, ssim

    train, test = _load_images(folder / "train", channels), _load_images(folder / "test", channels)
    model = _pythae_model(variant, channels, train.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # pythae's BaseTrainerConfig defaults
    generator = torch.Generator().manual_seed(0)
    model.train()
    steps, elapsed = _train_for(seconds, train, batch_size, generator, lambda x: model({"data": x}).loss, optimizer)
    model.eval()
    torch.manual_seed(0)  # pythae's samplers draw from the global generators (torch's and, for the mixture, numpy's)
    with torch.inference_mode():
        x = test.float() / 255.0
        recon = torch.cat([model.decoder(model.encoder(b).embedding)["reconstruction"] for b in x.split(100)])
        _save_grid(run / "heldout_reconstructions.png", torch.cat([x[:GRID_IMAGES], recon[:GRID_IMAGES]]), GRID_IMAGES)
        metrics = {"psnr": psnr(recon, x).mean().item(), "ssim": ssim(recon, x).mean().item()}
    import numpy as np

    np.random.seed(0)
    mixture = GaussianMixtureSampler(model)
    mixture.fit(train.float() / 255.0)  # pythae asserts max >= 1: real 8-bit images reach 255
    samplers = {"standard": NormalSampler(model), "mixture": mixture}
    two_sample = {}
    for name, sampler in samplers.items():
        with torch.inference_mode():
            drawn = sampler.sample(num_samples=max(64, sample_metric), batch_size=100).reshape(-1, *x.shape[1:])
        _save_grid(run / f"prior_samples_{name}.png", drawn[:64], 8)
        if sample_metric:
            from vaetool.inference.sample_metric import classifier_two_sample_test

            two_sample[name] = classifier_two_sample_test(x, drawn[:sample_metric], seed=0).to_dict()
    label = {"pythae": "pythae VAE (default MLP nets)", "pythae-celeba": "pythae VAE (CelebA conv nets)"}[variant]
    return {"family": variant, "label": label, "steps": steps, "train_s": round(elapsed, 1),
            "images_per_s": steps * batch_size / elapsed, "test": metrics,
            "parameters": sum(p.numel() for p in model.parameters()),
            # the table's column is the mixture's, the sampler pythae offers for better samples; both are kept
            "sample_metric": {"samples": {"two_sample": two_sample["mixture"]}, "standard": two_sample["standard"]}
            if sample_metric else None,
            "grids": {"samples": str(run / "prior_samples_mixture.png"),
                      "samples_standard": str(run / "prior_samples_standard.png"),
                      "reconstructions": str(run / "heldout_reconstructions.png")}}


PEERS = {"baseline": baseline_run,
         "pythae": lambda *a, **k: pythae_run(*a, variant="pythae", **k),
         "pythae-celeba": lambda *a, **k: pythae_run(*a, variant="pythae-celeba", **k)}
