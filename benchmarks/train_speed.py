"""Steady-state training speed of the default 64x64 model on CPU, against this machine's own peaks.

    python benchmarks/train_speed.py [--batch-size 64] [--seconds 20] [--threads 2]

Prints images/s, model FLOPs per image (torch.utils.flop_counter), achieved GFLOP/s, and the
float32 matmul and 3x3-conv GFLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import conv_gflops, matmul_gflops, training_flops_per_image
from vaetool.config import ModelConfig
from vaetool.model import VAE, elbo_loss
from vaetool.runtime import tune_cpu_allocator


def _loss(model: VAE, x: torch.Tensor) -> torch.Tensor:
    return elbo_loss(model, x, model(x)).loss


def measure_training(config: ModelConfig, *, batch: int, seconds: float, compile: bool = False) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the same step vaetool's trainer runs, on in-memory tensors."""
    torch.manual_seed(0)
    model = VAE(config).to(memory_format=torch.channels_last)
    x = torch.rand(batch, config.channels, config.image_size, config.image_size).contiguous(
        memory_format=torch.channels_last)
    flops = training_flops_per_image(model, _loss, x)
    net = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def step() -> torch.Tensor:
        out = net(x)
        terms = elbo_loss(model, x, out)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        return terms.loss.detach()

    for _ in range(3):  # warm-up: allocator, kernels, compilation
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    config = ModelConfig()
    matmul = matmul_gflops()
    conv = conv_gflops()
    rate, flops = measure_training(config, batch=args.batch_size, seconds=args.seconds, compile=args.compile)
    achieved = rate * flops / 1e9
    print(f"threads                 {args.threads}")
    print(f"model                   {config.image_size}px x{config.channels}, widths {config.widths}, "
          f"blocks {config.blocks}, latent {config.latent_dim}")
    print(f"batch                   {args.batch_size}")
    print(f"training FLOPs/image    {flops / 1e6:.1f} MFLOP (forward + backward)")
    print(f"training speed          {rate:.1f} images/s")
    print(f"achieved                {achieved:.1f} GFLOP/s")
    print(f"float32 matmul peak     {matmul:.1f} GFLOP/s  -> {100 * achieved / matmul:.0f}% of it")
    print(f"float32 3x3 conv peak   {conv:.1f} GFLOP/s  -> {100 * achieved / conv:.0f}% of it")


if __name__ == "__main__":
    main()
