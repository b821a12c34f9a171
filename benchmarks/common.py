"""Shared measuring helpers for the benchmarks: the machine's own peaks, FLOP counts, medians."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_gflops(size: int = 1024, seconds: float = 2.0) -> float:
    """float32 matmul throughput of this machine, GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def conv_gflops(batch: int = 64, channels: int = 64, size: int = 32, seconds: float = 2.0,
                dtype: torch.dtype = torch.float32) -> float:
    """3x3 convolution throughput (forward), channels_last, GFLOP/s, in float32 or bf16."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * channels * channels * 9 * size * size
    with torch.inference_mode():
        for _ in range(3):
            conv(x)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            conv(x)
            count += 1
    return flops * count / (time.perf_counter() - start) / 1e9


CONV_PARTS = ("forward", "input gradient", "weight gradient", "training")


def conv_training_gflops(batch: int = 64, channels: int = 64, size: int = 32, seconds: float = 2.0,
                         dtype: torch.dtype = torch.float32, part: str = "training") -> float:
    """3x3 convolution throughput, channels_last, GFLOP/s, of one part of training: the forward pass, the input
    gradient or the weight gradient alone (each as many FLOPs as the forward), or "training", all three
    together (forward then backward), the peak a training step is measured against."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(part in ("input gradient", "training"))
    conv.requires_grad_(part in ("weight gradient", "training"))
    forward_flops = 2 * batch * channels * channels * 9 * size * size
    grad_out = torch.randn_like(conv(x).detach())
    if part == "forward":
        def once() -> None:
            with torch.no_grad():
                conv(x)
    elif part == "training":  # gradients returned, not accumulated: a training step's first backward
        def once() -> None:
            torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad_out)
    else:  # one gradient alone: the backward of a kept graph, whose only leaf is the input or the weights
        y = conv(x)
        leaf = x if part == "input gradient" else conv.weight

        def once() -> None:
            torch.autograd.grad(y, leaf, grad_out, retain_graph=True)
    flops = forward_flops * (3 if part == "training" else 1)
    for _ in range(3):
        once()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        once()
        count += 1
    return flops * count / (time.perf_counter() - start) / 1e9


def training_flops_per_image(model: torch.nn.Module, loss_fn, x: torch.Tensor) -> float:
    """FLOPs of one forward + backward pass per image, from torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def median(values: list[float]) -> float:
    return statistics.median(values)
