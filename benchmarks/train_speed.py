"""Steady-state training speed of every model family on CPU, against this machine's own peaks.

    python benchmarks/train_speed.py [--kinds vector,spatial,hierarchical] [--batch-size 64] [--seconds 10]
                                     [--rounds 3] [--threads 2] [--compile]

Prints, per family at its defaults (64x64 RGB): parameters, model FLOPs per image (torch.utils.flop_counter),
images/s and achieved GFLOP/s, and that as a share of the machine's own 3x3 convolution *training* peak
(forward, input gradient and weight gradient of one channels_last conv, the same work a training step is
made of) in the precision the step ran in. The peaks (float32 and bf16, plus the float32 matmul) and the
training steps are timed in interleaved windows (peaks, each family, peaks, each family, ...) so each
figure shares the machine's load with its neighbours. Training is timed in float32 and, where `vaetool
train` defaults to it (CPUs with native bf16), in bf16 autocast as the trainer runs it; with `--compile`,
torch.compile'd training of the first family at the default precision too.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import conv_training_gflops, matmul_gflops, median, training_flops_per_image
from vaetool.config import ModelConfig
from vaetool.models.base import build_model, count_parameters, elbo_loss
from vaetool.runtime import autocast, resolve_precision, tune_cpu_allocator
from vaetool.training.trainer import make_optimizer

CPU = torch.device("cpu")


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return elbo_loss(model, x, model(x)).loss


def training_step(config: ModelConfig, *, batch: int, compile: bool = False, precision: str = "auto"):
    """(step function, model, FLOPs per image): the step vaetool's trainer runs (reparameterization noise per
    level from `model.latent_shapes`, autocast, ELBO, backward, clipping, AdamW) on one in-memory batch."""
    amp_dtype = resolve_precision(precision, CPU, training=True)
    torch.manual_seed(0)
    model = build_model(config).to(memory_format=torch.channels_last).train()
    x = torch.rand(batch, config.channels, config.image_size, config.image_size).contiguous(
        memory_format=torch.channels_last)
    flops = training_flops_per_image(model, _loss, x)
    net = torch.compile(model) if compile else model
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=CPU)
    generator = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        noise = {name: torch.randn(batch, *shape, generator=generator)
                 for name, shape in model.latent_shapes(*x.shape[-2:]).items()}
        with autocast(CPU, amp_dtype):
            out = net(x, noise=noise)
        terms = elbo_loss(model, x, out)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        return terms.loss.detach()

    for _ in range(3):  # warm-up: allocator, kernels, compilation
        step()
    return step, model, flops


def rate(step, *, batch: int, seconds: float) -> float:
    """Images/s of `step` over about `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="vector,spatial,hierarchical", help="model families, comma separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timed window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of peak and training windows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd training, interleaved")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    default = "bf16" if resolve_precision("auto", CPU, training=True) == torch.bfloat16 else "fp32"
    precisions = ["fp32"] + (["bf16"] if default == "bf16" else [])
    kinds = args.kinds.split(",")
    steps = {(kind, p): training_step(ModelConfig(kind=kind), batch=args.batch_size, precision=p)
             for kind in kinds for p in precisions}
    if args.compile:
        compile_start = time.perf_counter()
        steps[(kinds[0], "compiled")] = training_step(ModelConfig(kind=kinds[0]), batch=args.batch_size,
                                                      compile=True)
        compile_seconds = time.perf_counter() - compile_start
    peaks = {"matmul": matmul_gflops, "fp32": conv_training_gflops,
             "bf16": lambda: conv_training_gflops(dtype=torch.bfloat16)}
    results: dict = {name: [] for name in [*peaks, *steps]}
    for _ in range(args.rounds):  # A B A B: each window shares the machine's load with its neighbours
        for name, measure in peaks.items():
            results[name].append(measure())
        for key, (step, _, _) in steps.items():
            results[key].append(rate(step, batch=args.batch_size, seconds=args.seconds))
    med = {name: median(values) for name, values in results.items()}

    def spread(name) -> str:
        return f"{min(results[name]):.1f}-{max(results[name]):.1f}"

    print(f"threads {args.threads}; batch {args.batch_size}; 64x64 RGB; {args.rounds} interleaved rounds, medians "
          f"(min-max); vaetool train's default precision here: {default}")
    print(f"float32 matmul peak                  {med['matmul']:.1f} GFLOP/s ({spread('matmul')})")
    print(f"3x3 conv training peak, float32      {med['fp32']:.1f} GFLOP/s ({spread('fp32')})")
    print(f"3x3 conv training peak, bf16         {med['bf16']:.1f} GFLOP/s ({spread('bf16')})")
    print(f"{'family':13s} {'precision':9s} {'params':>10s} {'MFLOP/img':>9s} {'images/s':>17s} {'GFLOP/s':>8s}  "
          f"share of the peak")
    for (kind, precision), (_, model, flops) in steps.items():
        speed = med[(kind, precision)]
        achieved = speed * flops / 1e9
        peak = med["bf16" if precision == "bf16" or (precision == "compiled" and default == "bf16") else "fp32"]
        print(f"{kind:13s} {precision:9s} {count_parameters(model):>10,d} {flops / 1e6:9.1f} "
              f"{speed:7.1f} ({spread((kind, precision)):>9s}) {achieved:8.1f}  {100 * achieved / peak:.0f}%")
    if args.compile:
        print(f"torch.compile: {compile_seconds:.0f} s to compile; compiled / {default} = "
              f"{median([c / e for c, e in zip(results[(kinds[0], 'compiled')], results[(kinds[0], default)])]):.2f}")


if __name__ == "__main__":
    main()
