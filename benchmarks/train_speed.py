"""Steady-state training speed of the default 64x64 model on CPU, against this machine's own peaks.

    python benchmarks/train_speed.py [--batch-size 64] [--seconds 10] [--rounds 3] [--threads 2] [--compile]

Prints images/s, model FLOPs per image (torch.utils.flop_counter), achieved GFLOP/s, and the
float32 matmul and float32 and bf16 3x3-conv GFLOP/s measured in the same run, in interleaved
windows (peak, training, peak, training, ...) so that each figure shares the machine's load with its
neighbours. Training is timed in float32 and, where `vaetool train` defaults to it (CPUs with native
bf16), in bf16 autocast as the trainer runs it; with `--compile`, torch.compile'd training (at the
default precision) is timed in the same rounds.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import conv_gflops, matmul_gflops, median, training_flops_per_image
from vaetool.config import ModelConfig
from vaetool.models.base import elbo_loss
from vaetool.models.vector import VAE
from vaetool.runtime import autocast, resolve_precision, tune_cpu_allocator
from vaetool.training.trainer import make_optimizer

CPU = torch.device("cpu")


def _loss(model: VAE, x: torch.Tensor) -> torch.Tensor:
    return elbo_loss(model, x, model(x)).loss


def training_step(config: ModelConfig, *, batch: int, compile: bool = False, precision: str = "auto"):
    """(step function, FLOPs per image): the same step vaetool's trainer runs, on one in-memory batch, at
    `precision` ("auto": what `vaetool train` picks on this CPU)."""
    amp_dtype = resolve_precision(precision, CPU, training=True)
    torch.manual_seed(0)
    model = VAE(config).to(memory_format=torch.channels_last)
    x = torch.rand(batch, config.channels, config.image_size, config.image_size).contiguous(
        memory_format=torch.channels_last)
    flops = training_flops_per_image(model, _loss, x)
    net = torch.compile(model) if compile else model
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))

    def step() -> torch.Tensor:
        with autocast(CPU, amp_dtype):
            out = net(x)
        terms = elbo_loss(model, x, out)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        return terms.loss.detach()

    for _ in range(3):  # warm-up: allocator, kernels, compilation
        step()
    return step, flops


def rate(step, *, batch: int, seconds: float) -> float:
    """Images/s of `step` over about `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def measure_training(config: ModelConfig, *, batch: int, seconds: float, compile: bool = False,
                     precision: str = "auto") -> tuple[float, float]:
    """(images/s, FLOPs per image) of the trainer's step on in-memory tensors."""
    step, flops = training_step(config, batch=batch, compile=compile, precision=precision)
    return rate(step, batch=batch, seconds=seconds), flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timed window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of peak and training windows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd training, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    config = ModelConfig()
    default = "bf16" if resolve_precision("auto", CPU, training=True) == torch.bfloat16 else "fp32"
    steps = {"fp32": training_step(config, batch=args.batch_size, precision="fp32")}
    if default == "bf16":
        steps["bf16"] = training_step(config, batch=args.batch_size, precision="bf16")
    if args.compile:
        compile_start = time.perf_counter()
        steps["compiled"] = training_step(config, batch=args.batch_size, compile=True)
        compile_seconds = time.perf_counter() - compile_start
    flops = steps["fp32"][1]
    results: dict[str, list[float]] = {"matmul": [], "conv": [], "conv_bf16": [], **{name: [] for name in steps}}
    for _ in range(args.rounds):  # A B A B: each window shares the machine's load with its neighbours
        results["matmul"].append(matmul_gflops())
        results["conv"].append(conv_gflops())
        results["conv_bf16"].append(conv_gflops(dtype=torch.bfloat16))
        for name, (step, _) in steps.items():
            results[name].append(rate(step, batch=args.batch_size, seconds=args.seconds))
    med = {name: median(values) for name, values in results.items()}
    conv, matmul, conv_bf16 = med["conv"], med["matmul"], med["conv_bf16"]

    def spread(name: str) -> str:
        return f"{min(results[name]):.1f}-{max(results[name]):.1f}"

    print(f"threads                 {args.threads}; {args.rounds} interleaved rounds, medians (min-max)")
    print(f"model                   {config.image_size}px x{config.channels}, widths {config.widths}, "
          f"blocks {config.blocks}, patch {config.patch}, latent {config.latent_dim}")
    print(f"batch                   {args.batch_size}; vaetool train's default precision here: {default}")
    print(f"training FLOPs/image    {flops / 1e6:.1f} MFLOP (forward + backward)")
    print(f"float32 matmul peak     {matmul:.1f} GFLOP/s ({spread('matmul')})")
    print(f"float32 3x3 conv peak   {conv:.1f} GFLOP/s ({spread('conv')})")
    print(f"bf16 3x3 conv peak      {conv_bf16:.1f} GFLOP/s ({spread('conv_bf16')})")
    for name in steps:
        speed = med[name]
        achieved = speed * flops / 1e9
        in_bf16 = name == "bf16" or (name == "compiled" and default == "bf16")
        print(f"training, {name:9s}     {speed:.1f} images/s ({spread(name)}) = {achieved:.1f} GFLOP/s = "
              f"{100 * achieved / conv:.0f}% of the float32 conv peak"
              + (f", {100 * achieved / conv_bf16:.0f}% of the bf16 conv peak" if in_bf16 else ""))
    if default == "bf16":
        print(f"bf16 / fp32             {median([b / f for b, f in zip(results['bf16'], results['fp32'])]):.2f}")
    if args.compile:
        print(f"torch.compile           {compile_seconds:.0f} s to compile; compiled / {default} = "
              f"{median([c / e for c, e in zip(results['compiled'], results[default])]):.2f}")

if __name__ == "__main__":
    main()
