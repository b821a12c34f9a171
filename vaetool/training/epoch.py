"""End-of-epoch work as plain functions of their inputs: validation, finite-weight check, checkpoints, metrics, grids."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import Corruption, TrainConfig
from ..io.decode import to_float
from ..io.write import save_grid
from ..io.atomic import atomic_write_bytes
from ..models.base import VAEFamily
from .corrupt import step_generator, target_noise_variance, training_pair
from .distributed import World, all_reduce_sum

GRID_SAMPLES = 64
GRID_RECONSTRUCTIONS = 16
METRICS_FILE = "metrics.jsonl"


@torch.no_grad()
def validate(model: VAEFamily, pixels: torch.Tensor, index: torch.Tensor, *, batch: int, seed: int,
             device: torch.device, world: World, beta: float = 1.0,
             corruptions: Sequence[Corruption] = ()) -> dict[str, float]:
    """Validation -ELBO (beta = 1, fixed noise), the objective at the run's `beta`, and PSNR, in float32.

    A denoiser (`corruptions`) is validated as it is trained: its inputs are corrupted with fixed noise
    and it is scored against the clean images, so the PSNR is the denoised images'. One trained on noisy
    images alone (recorrupt) is scored against its recorrupted targets, and its PSNR is that of the clean
    images estimated: the targets' own noise variance taken off the mean squared error. `pixels` is the
    uint8 image cache (N, C, H, W), `index` the held-out rows; each process scores its shard and the
    sums are reduced, so every process returns the same figures.
    """
    if len(index) == 0:
        return {}
    was_training = model.training
    model.eval()  # the decoder scale is the stored one, as in `vaetool eval`
    shard = index[world.rank::world.size]
    sums = torch.zeros(6, device=device, dtype=torch.float64)  # -elbo, recon, kl, psnr, count, mse
    for k, start in enumerate(range(0, len(shard), batch)):
        rows = shard[start: start + batch]
        x = to_float(pixels[rows], device).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
        seen, target = training_pair(x, corruptions, generator=step_generator(seed, k, device, stream=2),
                                     global_batch=len(rows), rows=slice(None))
        out = model(seen, sample=True, generator=step_generator(seed, k, device, stream=1))
        recon = -model.log_likelihood(target, out.logits)  # (B,)
        kl = sum(out.kl_per_level().values())  # (B,)
        mse = (model.reconstruct(seen) - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
        sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum(), (-10.0 * torch.log10(mse)).sum(),
                             torch.tensor(float(len(rows)), device=device), mse.sum()]).double()
    model.train(was_training)
    total = all_reduce_sum(sums, world).tolist()
    n = max(total[4], 1.0)
    psnr, extra = total[3] / n, target_noise_variance(corruptions)
    if extra > 0:  # per image the estimate is too noisy to take a log of: the set's mean error, then its PSNR
        psnr = -10.0 * math.log10(max(total[5] / n - extra, 1e-10))
    return {"val_neg_elbo": total[0] / n, "val_recon": total[1] / n, "val_kl": total[2] / n,
            "val_objective": (total[1] + beta * total[2]) / n, "val_psnr": psnr}


def nonfinite_tensor(*modules: nn.Module | None) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, None when all are finite."""
    for module in modules:
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
    return None


def save_checkpoints(run_dir: Path, model: VAEFamily, *, train_config: TrainConfig, summary: dict[str, Any],
                     improved: bool) -> list[Path]:
    """last.safetensors always, model.safetensors when the epoch improved (or none exists yet); the paths written."""
    written = [ckpt.save_model(run_dir / ckpt.LAST_FILE, model, train_config=train_config, training=summary)]
    if improved or not (run_dir / ckpt.MODEL_FILE).exists():
        written.append(ckpt.save_model(run_dir / ckpt.MODEL_FILE, model, train_config=train_config, training=summary))
    return written


class MetricsLog:
    """metrics.jsonl, one JSON object per epoch.

    A fresh run in a folder that holds an older one (--force) replaces the old file atomically at its
    first epoch, so until the new run has something to show the old metrics stay readable.
    """

    def __init__(self, run_dir: Path, *, fresh: bool) -> None:
        self.path = run_dir / METRICS_FILE
        self.replace = fresh

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if self.replace:
            atomic_write_bytes(self.path, line.encode("utf-8"), force=True)
            self.replace = False
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)


@torch.no_grad()
def draw_grids(model: VAEFamily, pixels: torch.Tensor, index: torch.Tensor, run_dir: Path, *, seed: int, epoch: int,
               device: torch.device) -> None:
    """Samples from fixed prior draws and reconstructions of fixed images, one PNG each per epoch."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed + 12_345)  # on the CPU: the same draws on any device
    size = tuple(pixels.shape[-2:])
    latents = model.sample_prior(GRID_SAMPLES, generator=generator, size=size)  # level -> (64, ...)
    samples = model.mean_image(model.decode({k: v.to(device) for k, v in latents.items()})).cpu()
    x = to_float(pixels[index[:GRID_RECONSTRUCTIONS]], device)  # (16, C, H, W)
    pairs = torch.cat([x, model.reconstruct(x)]).cpu()
    model.train(was_training)
    folder = run_dir / "grids"
    save_grid(folder / f"epoch_{epoch:04d}_samples.png", samples, nrow=8, force=True)
    save_grid(folder / f"epoch_{epoch:04d}_reconstructions.png", pairs, nrow=len(x), force=True)
    save_grid(run_dir / "samples.png", samples, nrow=8, force=True)
    save_grid(run_dir / "reconstructions.png", pairs, nrow=len(x), force=True)


SPIKE_FACTOR = 20.0  # an epoch's KL this many times the recent median is a spike, not progress


def kl_spike(recent: list[float], kl: float, *, epoch: int) -> str | None:
    """A warning when this epoch's mean KL jumps far above the last epochs' (they recover, but the run's
    report marks the point and a user should know the learning rate may be too high)."""
    if len(recent) < 3 or not math.isfinite(kl):
        return None
    typical = sorted(recent)[len(recent) // 2]
    if kl <= SPIKE_FACTOR * max(typical, 1.0):
        return None
    return (f"epoch {epoch}: the KL jumped to {kl:.3g} nats per image, {kl / max(typical, 1.0):.0f}x the recent "
            f"{typical:.3g}; runs usually recover (the report marks the point), a lower --lr avoids it")
