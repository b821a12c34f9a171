"""Steady-state training speed of every model family on CPU, against this machine's own peaks.

    python benchmarks/train_speed.py [--kinds vector,spatial,hierarchical] [--batch-size 64] [--seconds 10]
                                     [--rounds 3] [--threads 2] [--compile] [--without-norm]
                                     [--peak-channels 64,128]
    python benchmarks/train_speed.py --profile vector

Prints, per family at its defaults (64x64 RGB): parameters, model FLOPs per image (torch.utils.flop_counter),
images/s and achieved GFLOP/s, and that as a share of the machine's own 3x3 convolution *training* peak
(forward, input gradient and weight gradient of one channels_last conv, the same work a training step is
made of) in the precision the step ran in, the best over the peak channel counts; each of the three parts is
also timed alone. The peaks (float32 and bf16, plus the float32 matmul) and the
training steps are timed in interleaved windows (peaks, each family, peaks, each family, ...) so each
figure shares the machine's load with its neighbours. Training is timed in float32 and, where `vaetool
train` defaults to it (CPUs with native bf16), in bf16 autocast as the trainer runs it; with `--compile`,
torch.compile'd training of the first family at the default precision too.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import CONV_PARTS, conv_training_gflops, matmul_gflops, median, training_flops_per_image
from vaetool.config import ModelConfig
from vaetool.models.base import build_model, count_parameters, elbo_loss
from vaetool.runtime import autocast, resolve_precision, tune_cpu_allocator
from vaetool.training.trainer import make_optimizer

CPU = torch.device("cpu")


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return elbo_loss(model, x, model(x)).loss


def training_step(config: ModelConfig, *, batch: int, compile: bool = False, precision: str = "auto",
                  without_norm: bool = False):
    """(step function, model, FLOPs per image): the step vaetool's trainer runs (reparameterization noise per
    level from `model.latent_shapes`, autocast, ELBO, backward, clipping, AdamW) on one in-memory batch.

    `without_norm` makes every GroupNorm the identity: not a model to train, but the speed the step would
    have if normalisation cost nothing, which bounds what a faster GroupNorm could gain."""
    amp_dtype = resolve_precision(precision, CPU, training=True)
    torch.manual_seed(0)
    model = build_model(config).to(memory_format=torch.channels_last).train()
    if without_norm:
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.forward = lambda h: h
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
    parser.add_argument("--without-norm", action="store_true",
                        help="also time each family at the default precision with GroupNorm as the identity")
    parser.add_argument("--profile", metavar="KIND",
                        help="instead: profile 5 steps of KIND at the default precision and print where the time goes")
    parser.add_argument("--peak-channels", default="64,128",
                        help="channel counts of the 3x3 convs (32x32 maps) the peaks are measured on; the best counts")
    return parser.parse_args()


def profile(kind: str, *, batch: int, steps: int = 5) -> None:
    """torch.profiler's table of the operators that take a training step's time, most first."""
    from torch.profiler import profile as torch_profile

    step, _, flops = training_step(ModelConfig(kind=kind), batch=batch)
    with torch_profile() as prof:
        for _ in range(steps):
            step()
    print(f"{kind}, batch {batch}, {steps} steps at vaetool train's default precision ({flops / 1e6:.0f} MFLOP/image)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    if args.profile:
        return profile(args.profile, batch=args.batch_size)
    default = "bf16" if resolve_precision("auto", CPU, training=True) == torch.bfloat16 else "fp32"
    precisions = ["fp32"] + (["bf16"] if default == "bf16" else [])
    kinds = args.kinds.split(",")
    steps = {(kind, p): training_step(ModelConfig(kind=kind), batch=args.batch_size, precision=p)
             for kind in kinds for p in precisions}
    if args.without_norm:
        for kind in kinds:
            steps[(kind, "no norm")] = training_step(ModelConfig(kind=kind), batch=args.batch_size,
                                                     without_norm=True)
    if args.compile:
        compile_start = time.perf_counter()
        steps[(kinds[0], "compiled")] = training_step(ModelConfig(kind=kinds[0]), batch=args.batch_size,
                                                      compile=True)
        compile_seconds = time.perf_counter() - compile_start
    # Each part of a conv's training (forward, input gradient, weight gradient, and all three) for float32 and
    # bf16 at each channel count: AMX's bf16 weight gradient runs at under half its forward's rate, and wider
    # convs fill its tiles better, so the peak a step is compared with is the best training figure measured.
    peaks = {"matmul": matmul_gflops}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for channels in (int(c) for c in args.peak_channels.split(",")):
            for part in CONV_PARTS:
                peaks[(dtype_name, channels, part)] = (lambda d=dtype, c=channels, p=part:
                                                       conv_training_gflops(channels=c, dtype=d, part=p))
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
    print("3x3 conv, 32x32 maps, batch", args.batch_size, "GFLOP/s:", "  ".join(f"{part:>15s}" for part in CONV_PARTS))
    for key in peaks:
        if key != "matmul" and key[2] == CONV_PARTS[0]:
            row = [f"{med[(key[0], key[1], part)]:15.1f}" for part in CONV_PARTS]
            print(f"  {key[0]:4s} {key[1]:4d} channels              ", "  ".join(row))
    for dtype_name in ("fp32", "bf16"):
        med[dtype_name] = max(value for key, value in med.items()
                              if isinstance(key, tuple) and len(key) == 3 and key[0] == dtype_name
                              and key[2] == "training")
        print(f"3x3 conv training peak, {dtype_name}        {med[dtype_name]:.1f} GFLOP/s (the best channel count)")
    print(f"{'family':13s} {'precision':9s} {'params':>10s} {'MFLOP/img':>9s} {'images/s':>17s} {'GFLOP/s':>8s}  "
          f"share of the peak")
    for (kind, precision), (_, model, flops) in steps.items():
        speed = med[(kind, precision)]
        achieved = speed * flops / 1e9
        peak = med["bf16" if precision == "bf16" or (precision != "fp32" and default == "bf16") else "fp32"]
        print(f"{kind:13s} {precision:9s} {count_parameters(model):>10,d} {flops / 1e6:9.1f} "
              f"{speed:7.1f} ({spread((kind, precision)):>9s}) {achieved:8.1f}  {100 * achieved / peak:.0f}%")
    if args.compile:
        print(f"torch.compile: {compile_seconds:.0f} s to compile; compiled / {default} = "
              f"{median([c / e for c, e in zip(results[(kinds[0], 'compiled')], results[(kinds[0], default)])]):.2f}")


if __name__ == "__main__":
    main()
