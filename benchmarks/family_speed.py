"""Training-step time of each model family at its defaults, measured back to back on the same batch.

    python benchmarks/family_speed.py [--batch-size 64] [--image-size 64] [--seconds 20] [--threads 2]
                                      [--precision auto] [--kinds vector,spatial,hierarchical]

One step is what the trainer runs: the reparameterization noise drawn per level from
`model.latent_shapes`, forward under the trainer's autocast, the ELBO, backward, clipping, AdamW.
The families are timed in interleaved rounds (vector, spatial, hierarchical, vector, ...) so that
each figure shares the machine's load with its neighbours; prints the parameter count, the FLOPs
per image (torch.utils.flop_counter), the median ms per step and the achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import median, training_flops_per_image
from vaetool.config import ModelConfig
from vaetool.models.base import build_model, count_parameters, elbo_loss
from vaetool.runtime import autocast, resolve_precision, tune_cpu_allocator
from vaetool.training.trainer import make_optimizer

CPU = torch.device("cpu")


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return elbo_loss(model, x, model(x)).loss


def training_step(config: ModelConfig, *, batch: int, precision: str):
    """(step function, model, FLOPs per image) for one in-memory batch, as the trainer runs a step."""
    amp_dtype = resolve_precision(precision, CPU, training=True)
    torch.manual_seed(0)
    model = build_model(config).to(memory_format=torch.channels_last).train()
    x = torch.rand(batch, config.channels, config.image_size, config.image_size).contiguous(
        memory_format=torch.channels_last)
    flops = training_flops_per_image(model, _loss, x)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=CPU)
    generator = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        noise = {name: torch.randn(batch, *shape, generator=generator)
                 for name, shape in model.latent_shapes(*x.shape[-2:]).items()}
        with autocast(CPU, amp_dtype):
            out = model(x, noise=noise)
        terms = elbo_loss(model, x, out)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        return terms.loss.detach()

    for _ in range(2):  # warm-up: allocator, kernels
        step()
    return step, model, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per family, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--kinds", default="vector,spatial,hierarchical")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    kinds = args.kinds.split(",")
    steps = {kind: training_step(ModelConfig(kind=kind, image_size=args.image_size), batch=args.batch_size,
                                 precision=args.precision) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            step = steps[kind][0]
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds / args.rounds:
                begin = time.perf_counter()
                step()
                times[kind].append(time.perf_counter() - begin)
    print(f"batch {args.batch_size} at {args.image_size}x{args.image_size}, {args.threads} threads, "
          f"precision {args.precision} ({resolve_precision(args.precision, CPU, training=True)})")
    base = median(times[kinds[0]])
    for kind in kinds:
        _, model, flops = steps[kind]
        ms = median(times[kind])
        print(f"{kind:13s} {count_parameters(model):>10,d} params  {flops / 1e6:8.1f} MFLOP/img  "
              f"{1e3 * ms:7.1f} ms/step ({ms / base:4.2f}x {kinds[0]})  "
              f"{flops * args.batch_size / ms / 1e9:6.1f} GFLOP/s  ({len(times[kind])} steps)")


if __name__ == "__main__":
    main()
