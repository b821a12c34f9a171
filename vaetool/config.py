"""Frozen configuration dataclasses for the model and for training; dict round trip and validation."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

LIKELIHOODS = ("gaussian", "laplace", "bernoulli")
# How the decoder's shared scale is set: learned by gradient, set to its closed-form optimum
# per batch (sigma-VAE, Rybkin et al. 2021), or fixed (fixed-variance Gaussian = weighted MSE).
DECODER_SCALES = ("learned", "optimal", "fixed")
CORRUPTIONS = ("gaussian", "mask", "saltpepper", "recorrupt")
# Recorrupted-to-recorrupted training (Pang et al. 2021) of a denoiser on noisy images y alone, their noise
# Gaussian of std sigma: the model sees y + alpha sigma z and is scored against y - sigma z / alpha (z ~ N(0, I)).
# The two noises are independent, so the expected error against that target is the error against the clean
# image plus a constant: a supervised denoiser's training without a clean image. alpha 1 puts the noise of both
# at 1.41 sigma. 4 minutes on the faces at std 25, `denoise`'s PSNR: alpha 0.5 (its target's noise 2.24 sigma)
# 31.56 dB, 1 32.13, 2 (its input's noise 2.24 sigma) 32.03; on the detail-rich set at 15, 0.5 30.08, 1 30.12
# (BENCHMARKS.md, "Denoising from noisy images alone, recorrupted").
RECORRUPT_ALPHA = 1.0
KINDS = ("vector", "spatial", "hierarchical")  # the model families (models/ registers one class per kind)
# The family `vaetool train` builds when none is chosen. At equal time (3 minutes on 2 cores, its second-stage prior
# inside the budget) the spatial family reconstructs held-out images 6-8 dB better than the vector family on the
# faces, the digits and the detail-rich set, and its samples score better by the two-sample test on the faces and
# the detail set, a little worse on the digits (BENCHMARKS.md, "The spatial family as the default"). `ModelConfig`'s
# own default stays vector: that is what a checkpoint without a `kind` was.
DEFAULT_KIND = "spatial"
# Each family's widths when none are given. The spatial family halves the resolution once per width,
# so its default depends on the downsampling f: two stages for f = 4, and so on. The vector family's are half
# the hierarchy's: at equal time 2.8x the steps, better on faces and digits at 3 and 10 minutes and level on the
# detail-rich set, where a 64-number bottleneck, not the widths, limits it (BENCHMARKS.md, "Narrower vector models").
DEFAULT_WIDTHS = {"vector": (16, 32, 64, 128), "hierarchical": (32, 64, 128, 256)}
SPATIAL_WIDTHS = (64, 128, 128, 256)  # the first log2(f) of these
LR_SCHEDULES = ("cosine", "constant")
# "gaussian": the model learns from noisy images alone (DivNoising, Prakash et al. 2021): the decoder gives
# the clean signal s(z), and the likelihood of an observed image is the noise model N(x; s, sigma^2).
NOISE_MODELS = ("none", "gaussian")
# A denoiser's model, when --corrupt or --noise-model is given and the user chose no family or latent shape:
# a spatial map at 1/2 resolution with 16 channels keeps the detail a denoiser must give back; at equal time it
# beat f = 4, C = 8 and the hierarchy on faces and the detail set, and runs faster (BENCHMARKS.md, "Denoising").
DENOISER_DEFAULTS = {"kind": "spatial", "downsample": 2, "latent_channels": 16}
# The KL weight of a supervised denoiser (--corrupt) when --beta is not given. It is scored on the clean image
# it must give back, and the full ELBO's KL makes it drop detail the noisy input still shows: at equal time beta
# 0.01 denoised 3.8 dB (detail-rich set) and 3.3 dB (faces) better than beta 1, and 0.3 dB better than 0.1
# (BENCHMARKS.md, "Denoising"). A model learning from noisy images alone (--noise-model) keeps beta 1: its KL
# is what stops it from encoding the noise.
SUPERVISED_DENOISER_BETA = 0.01


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and likelihood of a convolutional VAE; stored in every checkpoint.

    Checkpoints written before the families existed have no `kind`, `latent_channels`, `downsample`
    or `level_cells`: the defaults make them today's vector model.
    """

    kind: str = "vector"  # the model family (models/base.py registry); checkpoints without it are vector
    image_size: int = 64
    channels: int = 3
    latent_dim: int = 64  # vector: the size of z; hierarchical: the size of the top (global) latent
    widths: tuple[int, ...] = ()  # channels per stride-2 stage; () = the family's default (DEFAULT_WIDTHS)
    blocks: int = 1  # extra 3x3 conv layers per stage, after the resampling conv
    patch: int = 2  # 2: fold 2x2 pixel patches into channels before the first stage (faster); 1: plain conv
    latent_channels: int = 8  # spatial, hierarchical: channels of each latent map
    downsample: int = 4  # spatial: the latent map is 1/f of the image; hierarchical: the finest level's f
    level_cells: int = 1  # hierarchical: latent groups (cells) at each latent resolution
    likelihood: str = "gaussian"
    decoder_scale: str = "optimal"
    fixed_scale: float = 0.1  # the decoder's std when decoder_scale == "fixed"
    min_log_scale: float = -6.0  # floor of the log std, so a perfect fit cannot diverge
    noise_model: str = "none"  # "gaussian": trained on noisy images alone; p(x|z) is the noise model around s(z)
    noise_sigma: float = 0.0  # the noise model's std on the 0-1 scale; 0 until estimated from the images

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"unknown model kind {self.kind!r} (--model); use one of {', '.join(KINDS)}")
        _check(self.downsample in (2, 4, 8, 16), f"--downsample must be 2, 4, 8 or 16, not {self.downsample}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths) or self._default_widths())
        _check(self.channels in (1, 3), f"channels must be 1 or 3, not {self.channels}")
        _check(self.latent_dim >= 1, f"--latent-dim must be >= 1, not {self.latent_dim}")
        _check(self.latent_channels >= 1, f"--latent-channels must be >= 1, not {self.latent_channels}")
        _check(self.level_cells >= 1, f"--level-cells must be >= 1, not {self.level_cells}")
        _check(len(self.widths) >= 1 and all(w >= 1 for w in self.widths),
               f"widths must be positive, not {self.widths}")
        _check(self.blocks >= 0, f"blocks must be >= 0, not {self.blocks}")
        _check(self.patch in (1, 2), f"patch must be 1 or 2, not {self.patch}")
        self._check_family()
        _check(self.likelihood in LIKELIHOODS,
               f"likelihood must be one of {', '.join(LIKELIHOODS)}, not {self.likelihood!r}")
        _check(self.decoder_scale in DECODER_SCALES,
               f"decoder_scale must be one of {', '.join(DECODER_SCALES)}, not {self.decoder_scale!r}")
        _check(self.fixed_scale > 0, f"fixed_scale must be > 0, not {self.fixed_scale}")
        _check(self.noise_model in NOISE_MODELS,
               f"--noise-model must be one of {', '.join(NOISE_MODELS)}, not {self.noise_model!r}")
        _check(0 <= self.noise_sigma < 1, f"the noise sigma must be in [0, 1) (0-1 scale), not {self.noise_sigma}")
        _check(self.noise_model == "none" or self.likelihood == "gaussian",
               f"--noise-model {self.noise_model} is the likelihood itself; drop --likelihood {self.likelihood}")

    def _default_widths(self) -> tuple[int, ...]:
        if self.kind == "spatial":
            return SPATIAL_WIDTHS[: self.downsample.bit_length() - 1]
        return DEFAULT_WIDTHS.get(self.kind, DEFAULT_WIDTHS["vector"])

    def _check_family(self) -> None:
        """The image-size and downsampling rules of each family, with the flags that fix them."""
        factor = 2 ** len(self.widths)
        if self.kind == "spatial":
            _check(factor == self.downsample,
                   f"the spatial model halves the resolution once per width: --downsample {self.downsample} needs "
                   f"{self.downsample.bit_length() - 1} --widths, not {len(self.widths)} ({self.widths})")
        if self.kind == "hierarchical":
            _check(self.downsample <= factor,
                   f"--downsample {self.downsample} is finer than the hierarchy reaches with {len(self.widths)} "
                   f"--widths (at most {factor}); pick a smaller --downsample or more --widths")
        _check(self.image_size >= factor and self.image_size % factor == 0,
               f"image_size {self.image_size} must be a multiple of {factor} "
               f"(2 ** number of widths); pick another --image-size or fewer --widths")

    @property
    def bottom_size(self) -> int:
        """Side of the smallest feature map, after every stride-2 stage."""
        return self.image_size // 2 ** len(self.widths)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


def parse_noise_model(text: str) -> tuple[str, float]:
    """`gaussian` (sigma estimated from the images) or `gaussian:SIGMA` -> (kind, sigma on the 0-1 scale, 0 if
    to be estimated). SIGMA is on the 0-1 scale as --corrupt's (0.1), or on the 0-255 scale above 1 (25)."""
    match = re.fullmatch(r"\s*([a-z]+)\s*(?::\s*([0-9.eE+]+))?\s*", text.lower())
    if not match or match.group(1) not in NOISE_MODELS[1:]:
        raise ConfigError(f"cannot read noise model {text!r}; write gaussian (sigma estimated from the images) "
                          f"or gaussian:SIGMA, e.g. gaussian:0.1 or gaussian:25 (0-255 scale)")
    try:
        sigma = float(match.group(2)) if match.group(2) else 0.0
    except ValueError:
        raise ConfigError(f"cannot read the sigma in noise model {text!r}") from None
    sigma = sigma / 255.0 if sigma >= 1 else sigma
    _check(match.group(2) is None or 0 < sigma < 1, f"the noise sigma in {text!r} must be above 0")
    return match.group(1), sigma


@dataclass(frozen=True)
class Corruption:
    """One corruption applied to training inputs (denoising autoencoder, Vincent et al. 2008)."""

    # gaussian: noise std; mask: fraction of pixels dropped; saltpepper: fraction flipped; recorrupt: the std of
    # the Gaussian noise the training images already have (0 until estimated from them), one amount
    kind: str
    low: float
    high: float  # equal to low for a fixed amount; a range is drawn uniformly per image

    def __post_init__(self) -> None:
        _check(self.kind in CORRUPTIONS,
               f"corruption must be one of {', '.join(CORRUPTIONS)}, not {self.kind!r}")
        _check(0 <= self.low <= self.high, f"corruption amount {self.low}-{self.high} is not a range")
        if self.kind == "recorrupt":
            _check(self.low == self.high < 1, f"recorrupt takes one noise std below 1, not {self.low}-{self.high}")
        elif self.kind != "gaussian":
            _check(self.high <= 1, f"{self.kind} fraction must be <= 1, not {self.high}")

    @classmethod
    def parse(cls, text: str) -> Corruption:
        """Parse `kind:amount` or `kind:low-high`, e.g. `gaussian:0.05-0.2`, `mask:0.25`."""
        match = re.fullmatch(r"\s*([a-z_-]+)\s*:\s*([0-9.eE+]+)\s*(?:-\s*([0-9.eE+]+))?\s*", text)
        if not match:
            raise ConfigError(f"cannot read corruption {text!r}; write kind:amount or kind:low-high, "
                              f"e.g. gaussian:0.1 or mask:0.25")
        kind = match.group(1).replace("-", "").replace("_", "")
        kind = {"saltandpepper": "saltpepper", "sp": "saltpepper", "noise": "gaussian"}.get(kind, kind)
        try:
            low = float(match.group(2))
            high = float(match.group(3)) if match.group(3) else low
        except ValueError:
            raise ConfigError(f"cannot read the amount in corruption {text!r}") from None
        return cls(kind, low, high)

    def __str__(self) -> str:
        amount = f"{self.low:g}" if self.low == self.high else f"{self.low:g}-{self.high:g}"
        return f"{self.kind}:{amount}"


def recorruption(corruptions: Sequence[Corruption]) -> Corruption | None:
    """The `recorrupt` corruption among these (at most one, alone), or None."""
    return next((c for c in corruptions if c.kind == "recorrupt"), None)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, objective and data settings of a training run; stored in the checkpoint."""

    epochs: int | None = None
    steps: int | None = None
    time_limit: float | None = None  # seconds
    batch_size: int = 64  # per process
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 100.0
    beta: float = 1.0
    kl_warmup_steps: int = 0
    free_bits: float = 0.0  # nats per latent dimension (Kingma et al. 2016)
    val_fraction: float = 0.05
    seed: int = 0
    corruptions: tuple[Corruption, ...] = field(default_factory=tuple)
    ema: float = 0.0
    patience: int | None = None
    augment_flip: bool = False
    # Train on tiles of each image at its own resolution instead of the image resized (io/decode.py `load_patches`).
    patches: bool = False
    log_every: int = 25
    # Learning rate after the linear warm-up: a cosine decay to lr/10 over the budget, or constant.
    lr_schedule: str = "cosine"
    warmup_steps: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "corruptions", tuple(
            c if isinstance(c, Corruption) else Corruption(**c) for c in self.corruptions))
        for name in ("epochs", "steps", "patience"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1, not {value}")
        _check(self.time_limit is None or self.time_limit > 0, "time limit must be > 0")
        _check(self.batch_size >= 1, f"batch size must be >= 1, not {self.batch_size}")
        _check(self.lr > 0, f"learning rate must be > 0, not {self.lr}")
        _check(self.beta >= 0, f"beta must be >= 0, not {self.beta}")
        _check(self.kl_warmup_steps >= 0, "KL warm-up steps must be >= 0")
        _check(self.free_bits >= 0, "free bits must be >= 0")
        _check(0 <= self.val_fraction < 1, f"validation fraction must be in [0, 1), not {self.val_fraction}")
        _check(0 <= self.ema < 1, f"EMA decay must be in [0, 1), not {self.ema}")
        _check(self.grad_clip > 0, "gradient clip must be > 0")
        _check(self.log_every >= 1, "log_every must be >= 1")
        _check(self.lr_schedule in LR_SCHEDULES,
               f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        _check(self.warmup_steps >= 0, "warm-up steps must be >= 0")
        _check(len(self.corruptions) <= 1 or all(c.kind != "recorrupt" for c in self.corruptions),
               "recorrupt trains on noisy images alone and takes no other corruption")

    @property
    def recorrupt(self) -> Corruption | None:
        """The recorruption of a denoiser trained on noisy images alone, or None."""
        return recorruption(self.corruptions)

    def to_dict(self) -> dict[str, Any]:
        data = _to_dict(self)
        data["corruptions"] = [dataclasses.asdict(c) for c in self.corruptions]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        # A config stored before the schedule existed trained at a constant rate: a resumed old run goes on so.
        return _from_dict(cls, data if "lr_schedule" in data else {**data, "lr_schedule": "constant"})


def _to_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad {cls.__name__}: {exc}") from None
