"""Where and how computation runs: device choice, precision, threads and the CPU allocator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_allocator_tuned = False


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA (this process's local rank), then MPS, then CPU; others must exist."""
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; "
                          "use --device cpu or auto")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but Apple MPS is not available; use --device cpu or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast pays off.

    Elsewhere oneDNN emulates bf16 and it is slower than float32. The capability query is a private
    torch API; if it is missing, the answer is no.
    """
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


def resolve_precision(name: str, device: torch.device, *, training: bool = False) -> torch.dtype | None:
    """The autocast dtype, or None for float32.

    `auto`: bf16 on GPUs that support it, else fp32; for `training`, also bf16 on CPUs with native
    bf16. On this project's AVX512-BF16 machine training then ran 1.24x more images/s and, with the
    layers at the model's ends kept in float32 (`model._full_precision`), reached the same
    validation ELBO per step (BENCHMARKS.md). CPU inference stays float32: its outputs are files
    whose pixels should not move by a level between machines.
    """
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if training and device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA GPU (a gradient scaler keeps it stable there); use bf16 or fp32")
    return torch.bfloat16 if name == "bf16" else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """The --precision name of an autocast dtype: bf16, fp16, or fp32 for None."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when `dtype` is set, a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tune_cpu_allocator() -> None:
    """Keep freed memory in the process instead of returning it to the OS every step.

    glibc's malloc unmaps large blocks on free, so each training step page-faults its
    activations in again; on CPU that kernel time can cost a third of a step. Raising the
    mmap and trim thresholds (mallopt) makes freed buffers reusable. No-op off glibc.
    """
    global _allocator_tuned
    if _allocator_tuned or not sys.platform.startswith("linux"):
        return
    _allocator_tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks below 1 GiB come from the heap
        libc.mallopt(m_trim_threshold, 1 << 31)  # never trim the heap below 2 GiB of free space
    except (OSError, AttributeError):
        pass


def prepare(device: torch.device) -> None:
    """Process-wide settings for fast, repeatable computation on `device`."""
    if device.type == "cpu":
        tune_cpu_allocator()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


class BatchGatherer:
    """Gathers rows of a uint8 CPU tensor into a batch on `device`.

    On CUDA the rows are gathered into one of two pinned (page-locked) host buffers, so the copy to
    the GPU runs asynchronously (`non_blocking`) while the host prepares the next step; an event per
    buffer makes sure a buffer's previous copy has finished before it is refilled. Elsewhere it is a
    plain index and move.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event] = []
        self._turn = 0

    def __call__(self, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return source[index].to(self.device)
        shape = (len(index), *source.shape[1:])
        if not self._buffers or self._buffers[0].shape != shape:
            self._buffers = [torch.empty(shape, dtype=source.dtype).pin_memory() for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
            self._turn = 0
        buffer, event = self._buffers[self._turn], self._events[self._turn]
        self._turn = 1 - self._turn
        event.synchronize()  # the copy that last read this buffer is done (a no-op before the first record)
        torch.index_select(source, 0, index, out=buffer)
        batch = buffer.to(self.device, non_blocking=True)
        event.record()
        return batch
