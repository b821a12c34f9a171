"""Safetensors checkpoints: weights plus JSON config and metadata, and the resume state; atomic writes.

A fitted prior (a mixture, models/prior.py, or a second-stage VAE, models/second_stage.py) is stored
beside the weights as `prior.*` tensors; it is not part of the weights, so a checkpoint's identity (the
weights' hash) is the same with or without one.
Nothing here unpickles: `torch.load` is never called, so a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .io.atomic import atomic_path, write_safetensors
from .config import ModelConfig, TrainConfig
from .errors import CheckpointError, ConfigError
from .models.base import VAEFamily, build_model
from .models.prior import FittedPrior, prior_levels
from .models.second_stage import SecondStagePrior, second_stage_levels

FORMAT = "vaetool"
# The newest format this version reads: 2 is 1 plus a fitted mixture's tensors, 3 is 1 plus a second-stage prior's.
FORMAT_VERSION = 3
# A file is written at the oldest format that holds what it carries: an older vaetool still reads every
# checkpoint without a prior, and for one with a prior says to upgrade instead of calling it damaged.
PLAIN_FORMAT_VERSION = 1
MIXTURE_FORMAT_VERSION = 2
SECOND_STAGE_FORMAT_VERSION = 3
MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
STATE_FILE = "state.safetensors"
PRIOR_PREFIX = "prior."  # tensors of the fitted prior; no model's state dict has a key starting so
Prior = FittedPrior | SecondStagePrior  # what `vaetool sample --prior fitted` draws from


@dataclass
class Checkpoint:
    """A loaded model with what was stored beside it."""

    model: VAEFamily
    config: ModelConfig
    train_config: TrainConfig | None
    training: dict[str, Any] = field(default_factory=dict)  # step, epoch, metrics, data summary
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    prior: Prior | None = None  # a density fitted to the training images' posterior means, when stored

    @property
    def identity(self) -> str:
        return weights_hash(self.model)


def resolve_checkpoint(path: str | Path) -> Path:
    """A `.safetensors` file, or a run folder meaning its `model.safetensors`."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.is_file():
            raise CheckpointError(f"{path} is a folder without {MODEL_FILE}; give a run folder made by "
                                  f"`vaetool train` or a .safetensors file")
        return candidate
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run folder or a .safetensors checkpoint")
    return path


def _plain_state(model: VAEFamily) -> dict[str, torch.Tensor]:
    # Unwrap DDP / compiled modules; CPU, contiguous, no shared storage (safetensors refuses aliasing).
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in inner.state_dict().items()}


def weights_hash(model: VAEFamily) -> str:
    """A short SHA-256 of the weights: the checkpoint's identity in latents files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_plain_state(model).items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_model(path: str | Path, model: VAEFamily, *, train_config: TrainConfig | None = None,
               training: dict[str, Any] | None = None, force: bool = True,
               prior: Prior | None = None) -> Path:
    """Write the model's weights and config (and a fitted prior, when given) to `path` atomically."""
    inner = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
    metadata = {
        "format": FORMAT,
        "format_version": _format_version(prior),
        "vaetool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_config": json.dumps(inner.config.to_dict()),
        "train_config": json.dumps(train_config.to_dict() if train_config else None),
        "training": json.dumps(training or {}),
    }
    tensors = _plain_state(model) | (prior.to_tensors(PRIOR_PREFIX) if prior is not None else {})
    with atomic_path(path, force=force) as tmp:
        write_safetensors(tmp, tensors, metadata)
    return Path(path)


def save_prior(path: str | Path, prior: Prior | None, *, output: str | Path | None = None,
               force: bool = False) -> Path:
    """Store `prior` in the checkpoint at `path` (replacing any there; None removes it), atomically.

    Weights and metadata are copied unchanged, so the identity stays. With `output`, the result goes
    there instead (an existing file only with `force`); without it, `path` itself is rewritten.
    """
    path = resolve_checkpoint(path)
    metadata = read_metadata(path)
    _check_is_model(path, metadata)
    tensors = {k: v for k, v in _read_tensors(path).items() if not k.startswith(PRIOR_PREFIX)}
    if prior is not None:
        tensors |= prior.to_tensors(PRIOR_PREFIX)
    target = Path(output) if output is not None else path
    in_place = target.resolve() == path.resolve()
    with atomic_path(target, force=force or in_place) as tmp:
        write_safetensors(tmp, tensors, metadata | {"format_version": _format_version(prior)})
    return target


def _format_version(prior: Prior | None) -> str:
    if prior is None:
        return str(PLAIN_FORMAT_VERSION)
    return str(SECOND_STAGE_FORMAT_VERSION if isinstance(prior, SecondStagePrior) else MIXTURE_FORMAT_VERSION)


def _sniff(path: Path) -> None:
    """For a file safetensors could not read: say what it looks like (empty, a pickle) if we can tell."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"{path} is empty; expected a vaetool .safetensors checkpoint")
    if head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix.lower() in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a PyTorch pickle (.pt/.pth); vaetool never unpickles files, "
                              f"give a .safetensors checkpoint written by `vaetool train`")
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a checkpoint; give a .safetensors checkpoint written by "
                              f"`vaetool train` (or its run folder)")


_PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# File signatures of things people pass by mistake where a checkpoint belongs.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "a gzip archive"))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a vaetool file, checked for format and version."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        _sniff(path)
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); it may be "
                              f"damaged or truncated: give a vaetool .safetensors checkpoint") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a vaetool checkpoint "
                              f"(no vaetool metadata); give a file written by `vaetool train`")
    version = int(metadata.get("format_version", "0") or 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, newer than this vaetool "
                              f"({__version__}, format {FORMAT_VERSION}); upgrade vaetool")
    return metadata


def _check_is_model(path: Path, metadata: dict[str, str]) -> None:
    """A vaetool file that is not a model (training state, latents) gets its own message."""
    kind = metadata.get("kind")
    if kind == "train-state":
        raise CheckpointError(f"{path} is a vaetool training state (for --resume), not a model; give "
                              f"{MODEL_FILE} or {LAST_FILE} from the same run folder, or the folder itself")
    if kind == "latents":
        raise CheckpointError(f"{path} is a vaetool latents file (from `vaetool encode`), not a model; "
                              f"give the checkpoint that encoded it")
    if kind is not None:
        raise CheckpointError(f"{path} is a vaetool file of kind {kind!r}, not a model checkpoint")


def _state_mismatch(model: VAEFamily, state: dict[str, torch.Tensor]) -> str | None:
    """The first difference between stored tensors and the model's, in one short phrase (None: they fit)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            return (f"tensor {name} has shape {tuple(state[name].shape)} where the config needs "
                    f"{tuple(tensor.shape)}")
    return None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is damaged ({str(exc).splitlines()[0]}); "
                              f"use another checkpoint or retrain") from None


def _split_prior(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, prior tensors) of a checkpoint's tensors."""
    prior = {k: v for k, v in state.items() if k.startswith(PRIOR_PREFIX)}
    return {k: v for k, v in state.items() if k not in prior}, prior


def _load_prior(path: Path, tensors: dict[str, torch.Tensor], model: VAEFamily) -> Prior | None:
    """The stored prior, checked against the model's latent shapes at its image size; None when there is none."""
    if not tensors:
        return None
    staged = second_stage_levels(tensors, prefix=PRIOR_PREFIX)
    if len(staged) + len(prior_levels(tensors, prefix=PRIOR_PREFIX)) > 1:
        raise CheckpointError(f"{path} holds more than one fitted prior; run `vaetool fit-prior` again to keep one")
    try:
        if staged:
            prior = SecondStagePrior.from_tensors(tensors, prefix=PRIOR_PREFIX, level=staged[0])
        else:
            prior = FittedPrior.from_tensors(tensors, prefix=PRIOR_PREFIX)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    size = model.config.image_size
    shapes = model.latent_shapes(size, size)
    if tuple(shapes.get(prior.level, ())) != prior.shape:
        raise CheckpointError(f"{path}: the fitted prior is for latents {prior.level} {prior.shape}, which this "
                              f"model does not have; run `vaetool fit-prior` again")
    return prior


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a vaetool checkpoint (file or run folder) onto `device`, in eval mode, with its fitted prior if any."""
    path = resolve_checkpoint(path)
    metadata = read_metadata(path)
    _check_is_model(path, metadata)
    try:
        config = ModelConfig.from_dict(json.loads(metadata["model_config"]))
        train_raw = json.loads(metadata.get("train_config") or "null")
        train_config = TrainConfig.from_dict(train_raw) if train_raw else None
        training = json.loads(metadata.get("training") or "{}")
    except (KeyError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path} has an unreadable vaetool config ({exc}); it may be damaged") from None
    model = build_model(config)
    state, prior_tensors = _split_prior(_read_tensors(path))
    problem = _state_mismatch(model, state)
    if problem is None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # a dtype the parameter cannot take, say
            problem = next((line.strip() for line in str(exc).splitlines() if line.strip()), str(exc))[:200]
    if problem is not None:
        raise CheckpointError(f"{path} does not match its own config ({problem}); it is damaged or was edited, "
                              f"use another checkpoint or retrain") from None
    prior = _load_prior(path, prior_tensors, model)
    model.to(device).eval()
    return Checkpoint(model, config, train_config, training, path, metadata, prior)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimizer's state into tensors plus JSON for its param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, json.dumps(state["param_groups"])


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write resume state (optimizer, RNG, EMA, counters) as safetensors, atomically."""
    metadata = {"format": FORMAT, "format_version": str(PLAIN_FORMAT_VERSION), "kind": "train-state",
                "vaetool_version": __version__, "info": json.dumps(info)}
    with atomic_path(path, force=True) as tmp:
        write_safetensors(tmp, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata)
    return Path(path)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what `save_state` wrote."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; nothing to resume (start without --resume)")
    metadata = read_metadata(path)
    if metadata.get("kind") != "train-state":
        raise CheckpointError(f"{path} is not a vaetool training state")
    return _read_tensors(path), json.loads(metadata["info"])
