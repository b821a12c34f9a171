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


def conv_training_gflops(batch: int = 64, channels: int = 64, size: int = 32, seconds: float = 2.0,
                         dtype: torch.dtype = torch.float32) -> float:
    """3x3 convolution throughput for training (forward, input gradient and weight gradient together, each
    as many FLOPs as the forward), channels_last, GFLOP/s: the peak a training step is measured against."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    flops = 3 * 2 * batch * channels * channels * 9 * size * size

    def once() -> None:
        conv(x).sum().backward()

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
