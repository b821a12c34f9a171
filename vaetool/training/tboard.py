"""TensorBoard logging of a training run (scalars and image grids) as a training callback; tensorboard is optional."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import Callback, Epoch, Event, Progress
LOG_FOLDER = "tensorboard"
STEP_SCALARS = {"loss": "train/loss", "recon": "train/recon", "kl": "train/kl", "beta": "train/beta",
                "lr": "train/lr", "images_per_s": "speed/images_per_s"}
EPOCH_SCALARS = {"train_neg_elbo": "epoch/train_neg_elbo", "val_neg_elbo": "epoch/val_neg_elbo",
                 "val_recon": "epoch/val_recon", "val_kl": "epoch/val_kl", "val_psnr": "epoch/val_psnr",
                 "decoder_log_scale": "epoch/decoder_log_scale"}
GRIDS = ("samples", "reconstructions")


def require_tensorboard() -> None:
    """Raise ConfigError saying how to install tensorboard when it is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package, which is not installed: "
                          "pip install tensorboard (or pip install 'vaetool[tensorboard]')")


class TensorBoardLogger:
    """A training callback that logs to RUN_DIR/tensorboard and passes every event on to `inner`.

    The writer is made at the first event, so under torchrun only rank 0 (the only one the trainer
    reports to) writes event files. `writer` replaces the SummaryWriter (for tests).
    """

    def __init__(self, run_dir: str | Path, *, inner: Callback | None = None, writer: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.inner = inner
        self.writer = writer

    def _writer(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / LOG_FOLDER))
        return self.writer

    def __call__(self, event: Event) -> None:
        if self.inner is not None:
            self.inner(event)
        if isinstance(event, Progress) and event.metrics:  # training steps (the cache's progress has no metrics)
            for key, tag in STEP_SCALARS.items():
                if isinstance(event.metrics.get(key), (int, float)):
                    self._writer().add_scalar(tag, event.metrics[key], event.done)
            for key, value in event.metrics.items():
                if key.startswith("kl_") and isinstance(value, (int, float)):
                    self._writer().add_scalar(f"train/{key}", value, event.done)
        elif isinstance(event, Epoch):
            self._log_epoch(event.metrics)

    def _log_epoch(self, metrics: dict[str, Any]) -> None:
        writer, step = self._writer(), metrics["step"]
        for key, tag in EPOCH_SCALARS.items():
            if isinstance(metrics.get(key), (int, float)):
                writer.add_scalar(tag, metrics[key], step)
        for name in GRIDS:  # the trainer has drawn this epoch's grids before reporting the epoch
            path = self.run_dir / f"{name}.png"
            if path.is_file():
                writer.add_image(f"grids/{name}", _read_chw(path), step, dataformats="CHW")
        writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()


def _read_chw(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1))  # (3, H, W) uint8


def tensorboard_callback(run_dir: str | Path, inner: Callback | None = None) -> TensorBoardLogger:
    """The callback for `train(..., callback=...)` with --tensorboard; fails at once when tensorboard is missing."""
    require_tensorboard()
    return TensorBoardLogger(run_dir, inner=inner)
