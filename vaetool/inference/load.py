"""Loading a model for inference: one place that puts a checkpoint on its device, in eval mode, channels_last."""

from __future__ import annotations

import os

import torch

from .. import runtime
from ..checkpoint import Checkpoint, load_model
from ..errors import ConfigError
from ..models.base import VAEFamily

Source = str | os.PathLike | Checkpoint | VAEFamily  # a checkpoint file or run folder, or one already loaded
# Folder commands that handle every model family; any other `command` refuses a non-vector checkpoint.
ANY_FAMILY = frozenset({
    "denoise",
    "reconstruct",
})


def load_for_inference(source: Source, *, device: str | torch.device | None = "auto",
                       command: str | None = None) -> Checkpoint:
    """The model ready to run: on `device` (None: where it already is), in eval mode, channels_last.

    A path is loaded from disk; a bare model is wrapped without stored metadata. The process-wide
    settings for the device (allocator, TF32) are applied as for training. With a `command` outside
    `ANY_FAMILY`, a model whose latents are not one vector is refused in one line.
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
    if command is not None and command not in ANY_FAMILY and checkpoint.config.kind != "vector":
        raise ConfigError(f"`vaetool {command}` handles vector-family checkpoints only so far; this one is "
                          f"{checkpoint.config.kind} (from Python: vaetool.checkpoint.load_model(path).model has encode, decode, sample_prior and reconstruct)")
    if where is not None:
        checkpoint.model.to(where)
    # channels_last is the layout the convolutions run fastest in, on CPU as on GPU
    checkpoint.model.eval().to(memory_format=torch.channels_last)
    return checkpoint


def model_device(checkpoint: Checkpoint) -> torch.device:
    """The device the checkpoint's weights are on."""
    return next(checkpoint.model.parameters()).device
