"""Loading a model for inference: one place that puts a checkpoint on its device, in eval mode, channels_last."""

from __future__ import annotations

import os

import torch

from .. import runtime
from ..checkpoint import Checkpoint, load_model
from ..models.base import VAEFamily

Source = str | os.PathLike | Checkpoint | VAEFamily  # a checkpoint file or run folder, or one already loaded


def load_for_inference(source: Source, *, device: str | torch.device | None = "auto") -> Checkpoint:
    """The model ready to run: on `device` (None: where it already is), in eval mode, channels_last.

    A path is loaded from disk; a bare model is wrapped without stored metadata. The process-wide
    settings for the device (allocator, TF32) are applied as for training.
    """
    where = runtime.resolve_device(device) if isinstance(device, str) else device
    if where is not None:
        runtime.prepare(where)
    if isinstance(source, Checkpoint):
        checkpoint = source
    elif isinstance(source, VAEFamily):
        checkpoint = Checkpoint(source, source.config, None)
    else:
        checkpoint = load_model(source, device=where or "cpu")
    if where is not None:
        checkpoint.model.to(where)
    # channels_last is the layout the convolutions run fastest in, on CPU as on GPU
    checkpoint.model.eval().to(memory_format=torch.channels_last)
    return checkpoint


def model_device(checkpoint: Checkpoint) -> torch.device:
    """The device the checkpoint's weights are on."""
    return next(checkpoint.model.parameters()).device
