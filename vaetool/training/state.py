"""What a run folder keeps between invocations: the counters, the resume state (read once), and the run record."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .. import checkpoint as ckpt
from ..config import ModelConfig, TrainConfig
from ..io.atomic import atomic_write_bytes

RUN_RECORD = "run.json"


@dataclass
class Counters:
    """Everything about the run's progress that --resume must restore; saved as JSON in the state file."""

    step: int = 0
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    best: float = math.inf  # the best epoch's score: validation recon + beta KL (else training's); -ELBO at beta 1
    bad_epochs: int = 0
    elapsed: float = 0.0  # seconds of training before this process started
    best_epoch: int = 0
    best_psnr: float | None = None
    best_neg_elbo: float | None = None  # the best epoch's -ELBO (the score itself in states saved before)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counters:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})  # older states lack the newer fields


@dataclass
class ResumeState:
    """The state file of a run, read once: tensors (model., ema., optimizer.) and the JSON beside them."""

    tensors: dict[str, torch.Tensor]
    model_config: ModelConfig
    train_config: TrainConfig
    counters: Counters
    optimizer_groups: str

    @classmethod
    def read(cls, run_dir: Path) -> ResumeState:
        tensors, info = ckpt.load_state(run_dir / ckpt.STATE_FILE)
        return cls(tensors, ModelConfig.from_dict(info["model_config"]), TrainConfig.from_dict(info["train_config"]),
                   Counters.from_dict(info["progress"]), info["optimizer_groups"])

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under `prefix` ("model." or "ema."), without it."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def save_state(run_dir: Path, *, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
               counters: Counters, train_config: TrainConfig, model_config: ModelConfig) -> Path:
    """Write everything --resume needs: raw weights, EMA, optimizer, counters and configs."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    optimizer_tensors, groups = ckpt.optimizer_tensors(optimizer)
    tensors.update(optimizer_tensors)
    info = {"progress": dataclasses.asdict(counters), "optimizer_groups": groups,
            "train_config": train_config.to_dict(), "model_config": model_config.to_dict()}
    return ckpt.save_state(run_dir / ckpt.STATE_FILE, tensors, info)


def run_record(*, data: list[str], device: torch.device, precision: str, world_size: int,
               invocation: dict[str, Any] | None, resumed: bool) -> dict[str, Any]:
    """Where a run came from: the caller's command line and options, data folders, device and precision."""
    record: dict[str, Any] = dict(invocation or {})
    record.update({
        "data": data, "device": device_name(device), "precision": precision, "world_size": world_size,
        "resumed": resumed, "vaetool_version": __version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return record


def write_run_record(run_dir: Path, record: dict[str, Any]) -> Path:
    """run.json: this invocation's record, with those of the invocations before it (when resumed) under "previous"."""
    path = run_dir / RUN_RECORD
    previous: list[dict[str, Any]] = []
    if record.get("resumed") and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            previous = [*old.pop("previous", []), old] if isinstance(old, dict) else []
        except (OSError, json.JSONDecodeError):
            previous = []  # a damaged record costs the history, never the run
    text = json.dumps({**record, "previous": previous} if previous else record, indent=2, default=str)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"), force=True)


def device_name(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H100)` or `cpu (AMD EPYC ...)`: the device and the chip behind it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        chip = _cpu_model()
        return f"cpu ({chip})" if chip else "cpu"
    return str(device)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
