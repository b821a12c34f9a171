"""The up stages' conv over a nearest-upsampled map: upsampling first against `conv_upsampled` (models/layers.py).

    python benchmarks/upsample_conv.py [--rounds 3] [--seconds 6] [--kinds spatial,vector,hierarchical]

Three measurements, each interleaving the two ways in one process (`UpsampleConv`'s forward against the plain
`nn.Sequential` one, nn.Upsample then the conv, which is what the models ran before):

    one conv     forward + backward of one up conv, batch 64, channels_last, per input size and widths, ms
    training     each family's training step at its defaults (64x64 RGB, batch 64), float32 and, where the
                 CPU has native bf16, bf16 autocast, images/s per round
    decoding     the spatial family's decoder on posterior means, inference mode, images/s per round
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from train_speed import rate, training_step
from vaetool.config import ModelConfig
from vaetool.models.base import build_model
from vaetool.models.layers import UpsampleConv, conv_upsampled
from vaetool.runtime import resolve_precision, tune_cpu_allocator

WAYS = {"upsampled first": nn.Sequential.forward, "at low resolution": UpsampleConv.forward}
SHAPES = ((128, 64, 16), (128, 128, 16), (64, 32, 16), (32, 16, 16), (256, 128, 8), (128, 64, 8), (64, 32, 8),
          (128, 64, 4))  # (in channels, out channels, input side)


def _upsampled_first(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def one_conv(precisions: list[str], repeats: int = 20) -> None:
    print("one up conv, batch 64, forward + backward, ms: upsampled first -> at low resolution")
    for cin, cout, side in SHAPES:
        x = torch.randn(64, cin, side, side).to(memory_format=torch.channels_last).requires_grad_()
        conv = nn.Conv2d(cin, cout, 3, padding=1).to(memory_format=torch.channels_last)
        cells = []
        for precision in precisions:
            times = []
            for way in (_upsampled_first, conv_upsampled):
                def step() -> None:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        y = way(conv, x)
                    y.backward(torch.ones_like(y))
                for _ in range(3):
                    step()
                start = time.perf_counter()
                for _ in range(repeats):
                    step()
                times.append((time.perf_counter() - start) / repeats * 1e3)
            cells.append(f"{precision} {times[0]:6.2f} -> {times[1]:6.2f}")
        print(f"  {cin:4d} -> {cout:4d} channels, {side:2d} px in:   " + "   ".join(cells), flush=True)


def training(kinds: list[str], precisions: list[str], *, rounds: int, seconds: float) -> None:
    steps = {(kind, p): training_step(ModelConfig(kind=kind), batch=64, precision=p)[0]
             for kind in kinds for p in precisions}
    rates: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(rounds):
        for (kind, precision), step in steps.items():
            for name, forward in WAYS.items():
                UpsampleConv.forward = forward
                rates.setdefault((kind, precision, name), []).append(rate(step, batch=64, seconds=seconds))
    UpsampleConv.forward = WAYS["at low resolution"]
    print("training step, images/s per round")
    for (kind, precision, name), values in rates.items():
        print(f"  {kind:13s} {precision}  {name:18s} " + "  ".join(f"{v:7.1f}" for v in values), flush=True)


@torch.inference_mode()
def decoding(precisions: list[str], *, rounds: int, repeats: int = 8) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="spatial")).eval().to(memory_format=torch.channels_last)
    x = torch.rand(64, 3, 64, 64).to(memory_format=torch.channels_last)
    z = {"z": model.encode(x).levels["z"].mu}
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, forward in WAYS.items():
            UpsampleConv.forward = forward
            for precision in precisions:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    model.decode(z)
                    start = time.perf_counter()
                    for _ in range(repeats):
                        model.decode(z)
                rates.setdefault((precision, name), []).append(64 * repeats / (time.perf_counter() - start))
    UpsampleConv.forward = WAYS["at low resolution"]
    print("spatial decoder, images/s per round")
    for (precision, name), values in rates.items():
        print(f"  {precision}  {name:18s} " + "  ".join(f"{v:7.1f}" for v in values), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each training window")
    parser.add_argument("--kinds", default="spatial,vector,hierarchical")
    args = parser.parse_args()
    tune_cpu_allocator()
    has_bf16 = resolve_precision("auto", torch.device("cpu"), training=True) == torch.bfloat16
    precisions = ["fp32"] + (["bf16"] if has_bf16 else [])
    one_conv(precisions)
    training(args.kinds.split(","), precisions, rounds=args.rounds, seconds=args.seconds)
    decoding(precisions, rounds=args.rounds)


if __name__ == "__main__":
    main()
