"""`vaetool train` and `vaetool info`."""

from __future__ import annotations

import dataclasses
import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import (DEFAULT_KIND, DEFAULT_WIDTHS, DENOISER_DEFAULTS, SUPERVISED_DENOISER_BETA, Corruption,
                      ModelConfig, TrainConfig, parse_noise_model)
from ..errors import ConfigError
from .common import EXIT_INTERRUPTED, Display, emit, info, make_progress, warn
from .options import (BATCH_SIZE, BUDGET, DATA, MODEL, OBJECTIVE, OPTIMISATION, OUTPUT, PERFORMANCE, Channels, Checkpoint,
                      DecoderScale, Device, Json, Likelihood, LrSchedule, ModelKind, Precision, PriorKind, Quiet,
                      Widths, batch_size_option, check_model_shape, flag, force_option, non_negative, parse_corruption,
                      parse_duration, parse_size, parse_widths, positive, seed_option, workers_option)

SECOND_STAGE_LINE_EVERY = 500  # steps between the second stage's plain progress lines (it makes 25-65 a second)


class _TrainDisplay(Display):
    """The shared display, with training's own start line, bar status and one line per epoch.

    An unreadable training image is skipped with a warning (the run goes on without it), not a failed output.
    """

    def __init__(self, quiet: bool) -> None:
        super().__init__("train", quiet=quiet)
        self.log_every = 25
        self.total_steps: int | None = None

    def _on_started(self, e: Any) -> None:
        if e.command != "train":  # decoding the images into the cache
            self._start_bar(e.command, e.total)
            return
        d, cfg = e.info, e.info["config"]
        if self.failed:
            warn(f"{self.failed} file(s) could not be read and were skipped")
        cache = "reused on-disk cache" if d["cache_reused"] else ("memory-mapped cache" if d["cache_on_disk"] else "in-memory cache")
        kind = cfg.get("kind", "vector")
        side = cfg["image_size"] // cfg.get("downsample", 1)
        latent = (f"latent map {cfg['latent_channels']}x{side}x{side}" if kind == "spatial"
                  else f"latent {cfg['latent_dim']}")
        rows = (f"{d['train']} training and {d['val']} validation patches of {cfg['image_size']}px cut from "
                f"{d['images']} images at their own resolution" if d.get("patches") and d["train"] + d["val"] > d["images"]
                else f"{d['train']} training and {d['val']} validation images")
        self._line(f"{rows} ({cache}); {kind} "
                   f"model {cfg['image_size']}px x{cfg['channels']}, {latent}, widths "
                   f"{cfg['widths']}, {cfg['likelihood']} likelihood; batch {d['batch']} per process x {d['world']} "
                   f"= {d['global_batch']}; device {d['device']} ({d['precision']})")
        self.log_every, self.total_steps = d.get("log_every", 25), e.total
        # The bar counts the share of the budget spent (steps or --time, whichever ends first): a fixed
        # total whose rate gives a true ETA; the steps are in the status.
        self.close()
        self.progress, self.task = make_progress(self.quiet, counts=False), None
        self._start_bar("train", 1.0)

    def _on_progress(self, e: Any) -> None:
        if self.task is None:
            return
        m = e.metrics
        if not m:  # the cache's progress
            self.progress.update(self.task, completed=e.done, total=e.total)
            return
        steps = f"step {e.done}/{e.total}" if e.total else f"step {e.done}"
        if "epoch" not in m:  # the second-stage prior trained after the run
            status = f"second stage {steps} loss {m['loss']:.1f}"
            self.progress.update(self.task, completed=min(max(m["budget"], 0.0), 1.0), status=status)
            if self.progress.disable and e.done % SECOND_STAGE_LINE_EVERY == 0:  # no bar: a line now and then
                self._line(status)
            return
        status = f"{steps} ep {m['epoch']} loss {m['loss']:.1f} kl {m['kl']:.1f} {m['images_per_s']:.0f} img/s"
        fraction = min(max(m["budget"], 0.0), 1.0)
        self.progress.update(self.task, completed=fraction, status=status)
        if self.progress.disable and e.done % self.log_every == 0:  # no bar: a plain line now and then
            eta = m["elapsed"] * (1 - fraction) / fraction if fraction > 0 else None
            left = f", eta {_clock(eta)}" if eta is not None else ""
            self._line(f"{status} lr {m['lr']:.3g}, {100 * fraction:.0f}% of the budget{left}")

    def _on_epoch(self, e: Any) -> None:
        d = e.metrics
        val = (f" val -elbo {d['val_neg_elbo']:.1f} psnr {d['val_psnr']:.2f}dB" if "val_neg_elbo" in d else "")
        mark = " *" if d.get("best") else ""
        line = (f"epoch {d['epoch']} step {d['step']}: loss {d['train_loss']:.1f} (rec {d['train_recon']:.1f}, "
                f"kl {d['train_kl']:.1f}){val}{mark}")
        self._line(line)

    def _on_failed(self, e: Any) -> None:
        self.failed += 1
        warn(f"skipped {e.input}: {e.reason}")


def _setting(name: str, value: Any) -> Any:
    """A stored setting as the option that sets it is written: corruptions as `gaussian:0.05-0.2`."""
    if name == "corruptions":
        return ", ".join(str(Corruption(**c)) for c in value)
    return value


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# Options that --resume cannot honour: the run's stored config wins (only the budget, the device and the
# data-handling options apply to a resumed run). Each maps to its (section, key) in the stored config.
RESUME_IGNORES = {
    **{name: ("model_config", name) for name in ("image_size", "channels", "latent_dim", "latent_channels",
                                                  "downsample", "level_cells", "widths", "blocks", "patch",
                                                  "likelihood", "decoder_scale", "fixed_scale")},
    "model": ("model_config", "kind"), "noise_model": ("model_config", "noise_model"),
    **{name: ("train_config", name) for name in ("batch_size", "lr", "lr_schedule", "warmup_steps", "seed", "beta", "free_bits", "val_fraction",
                                                  "ema", "patience", "grad_clip", "log_every")},
    "kl_warmup": ("train_config", "kl_warmup_steps"), "corrupt": ("train_config", "corruptions"),
    "flip": ("train_config", "augment_flip"), "patches": ("train_config", "patches")}
RUN_RECORD = "run.json"  # the run's provenance, written by the trainer: {"data": [the data folders], ...}

Data = Annotated[Optional[list[str]], typer.Argument(
    metavar="DATA", show_default=False,
    help="Image files or folders (recursive), or - to read paths from stdin. With --resume it may be left out "
         "when OUTPUT/run.json records the run's data.")]


def _noise_model(value: str | None) -> str | None:
    """Option callback: gaussian or gaussian:SIGMA, checked now."""
    if value is not None:
        try:
            parse_noise_model(value)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def train(
    ctx: typer.Context,
    data: Data = None,
    *,
    image_size: Annotated[int, typer.Option(min=1, rich_help_panel=DATA, help="Images are resized and centre-cropped to this square size (with --patches, the tiles' side); a multiple of 2 ** (number of --widths).")] = 64,
    channels: Annotated[Channels, typer.Option(rich_help_panel=DATA, help="auto: 1 if every image is grayscale, else 3.")] = Channels.auto,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, callback=non_negative, rich_help_panel=DATA, help="Share of images held out for validation.")] = 0.05,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", metavar="", show_default=False, rich_help_panel=DATA, help="Random horizontal flips of the training images. On by default for a denoiser (--corrupt, --noise-model), as denoisers' training usually is; `denoise` then also averages each image's estimate with its mirror image's. --no-flip for data whose mirror image is unlike it (text, documents).")] = None,
    patches: Annotated[Optional[bool], typer.Option("--patches/--resize", metavar="", show_default=False, rich_help_panel=DATA, help="--patches: cut each image into IMAGE_SIZE tiles at its own resolution (a centred grid, nothing resampled; a side shorter than a tile is resized up to it) instead of resizing the image to IMAGE_SIZE. The default of a denoiser (--corrupt, --noise-model): resizing averages away the noise it must learn, and `denoise` works at the files' own resolution. --resize: the default otherwise.")] = None,
    strict: flag("--strict", help="Stop at the first unreadable image instead of skipping it.", panel=DATA) = False,
    model: Annotated[ModelKind, typer.Option("--model", case_sensitive=False, rich_help_panel=MODEL, help="Model family: spatial (a latent map at 1/--downsample of the image; sampled through a second-stage prior), vector (one latent vector z), hierarchical (a top vector and latent maps below it, each with a learned prior).")] = ModelKind(DEFAULT_KIND),
    latent_dim: Annotated[int, typer.Option(min=1, rich_help_panel=MODEL, help="Size of the latent vector z (vector), or of the top latent (hierarchical).")] = 64,
    latent_channels: Annotated[int, typer.Option(min=1, rich_help_panel=MODEL, help="Channels of each latent map (spatial, hierarchical).")] = 8,
    downsample: Annotated[int, typer.Option(min=2, rich_help_panel=MODEL, help="Latent maps at 1/f of the image resolution: 2, 4 or 8 (spatial: the one map; hierarchical: the finest).")] = 4,
    level_cells: Annotated[int, typer.Option(min=1, rich_help_panel=MODEL, help="Latent groups per resolution (hierarchical).")] = 1,
    widths: Annotated[Optional[Widths], typer.Option(parser=parse_widths, metavar="W,W,...", rich_help_panel=MODEL, help="Channels of each stride-2 stage, comma separated (default: the family's own: 32,64,128,256; spatial: one stage per halving).")] = None,
    blocks: Annotated[int, typer.Option(min=0, rich_help_panel=MODEL, help="Extra residual conv layers per stage.")] = 1,
    patch: Annotated[int, typer.Option(min=1, max=2, rich_help_panel=MODEL, help="2: fold 2x2 pixel patches into channels before the first stage (faster on CPUs); 1: a stride-2 conv.")] = 2,
    likelihood: Annotated[Likelihood, typer.Option(case_sensitive=False, rich_help_panel=OBJECTIVE, help="The decoder's distribution p(x|z).")] = Likelihood.gaussian,
    decoder_scale: Annotated[DecoderScale, typer.Option(case_sensitive=False, rich_help_panel=OBJECTIVE, help="Gaussian/Laplace scale: optimal (its closed-form maximum-likelihood value per batch, sigma-VAE), learned, or fixed.")] = DecoderScale.optimal,
    fixed_scale: Annotated[float, typer.Option(callback=positive, rich_help_panel=OBJECTIVE, help="Decoder std with --decoder-scale fixed (0.1 = MSE weighted by 50).")] = 0.1,
    beta: Annotated[float, typer.Option(callback=non_negative, rich_help_panel=OBJECTIVE, help="KL weight; 1 is the true ELBO (no tuning needed with the calibrated decoder scale); 0 trains a plain autoencoder. With --corrupt or --recorrupt the default is 0.01.")] = 1.0,
    kl_warmup: Annotated[int, typer.Option(min=0, rich_help_panel=OBJECTIVE, help="Steps over which beta rises linearly from 0.")] = 0,
    free_bits: Annotated[float, typer.Option(callback=non_negative, rich_help_panel=OBJECTIVE, help="Minimum KL per latent dimension, nats (batch average).")] = 0.0,
    corrupt: Annotated[Optional[list[Corruption]], typer.Option(parser=parse_corruption, metavar="KIND:AMOUNT", rich_help_panel=OBJECTIVE, help="Train as a denoiser: gaussian:STD, gaussian:LO-HI, mask:FRACTION, saltpepper:FRACTION; repeat to combine.")] = None,
    noise_model: Annotated[Optional[str], typer.Option("--noise-model", callback=_noise_model, metavar="gaussian[:SIGMA]", rich_help_panel=OBJECTIVE, help="Learn from noisy images alone (DivNoising): the decoder gives the clean image and the likelihood is Gaussian noise of std SIGMA around it (0-1 scale, or 0-255 above 1; estimated from the images when left out). `vaetool denoise` then returns the MMSE estimate.")] = None,
    recorrupt: flag("--recorrupt", help="With --noise-model gaussian[:SIGMA]: learn to denoise the noisy images by recorrupting them (Pang et al. 2021) instead of DivNoising's noise model: the model sees each image with more noise and is scored against it with that noise taken out the other way, which in expectation scores it against the clean image. Trains as --corrupt does (the same model and KL weight); no diverse samples.", panel=OBJECTIVE) = False,
    batch_size: batch_size_option("Images per optimiser step per process; under torchrun the global batch is this x the number of processes.", OPTIMISATION) = BATCH_SIZE,
    lr: Annotated[float, typer.Option(callback=positive, rich_help_panel=OPTIMISATION, help="AdamW learning rate (reached after 20 warm-up steps).")] = 2e-3,
    lr_schedule: Annotated[LrSchedule, typer.Option(case_sensitive=False, rich_help_panel=OPTIMISATION, help="cosine: decay to lr/10 as the budget (steps, epochs or --time) is spent; constant: keep lr.")] = LrSchedule.cosine,
    grad_clip: Annotated[float, typer.Option(callback=positive, rich_help_panel=OPTIMISATION, help="Clip the gradient norm to this.")] = 100.0,
    ema: Annotated[float, typer.Option(min=0.0, max=0.99999, callback=non_negative, rich_help_panel=OPTIMISATION, help="EMA decay of the weights (e.g. 0.999); the EMA weights are evaluated and saved.")] = 0.0,
    seed: seed_option(OPTIMISATION) = 0,
    epochs: Annotated[Optional[int], typer.Option(min=1, rich_help_panel=BUDGET, help="Passes over the data (default 30 when no budget is given).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, rich_help_panel=BUDGET, help="Optimiser steps in total.")] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time", parser=parse_duration, metavar="DURATION", rich_help_panel=BUDGET, help="Wall-clock budget for this invocation, e.g. 90s, 10m, 1h30m.")] = None,
    patience: Annotated[Optional[int], typer.Option(min=1, rich_help_panel=BUDGET, help="Stop after this many epochs without a better validation -ELBO.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", rich_help_panel=OUTPUT, help="Run folder for checkpoints, metrics and grids.")],
    resume: flag("--resume", help="Continue the run in OUTPUT exactly where it stopped, with its own config (a new budget may be given).", panel=OUTPUT) = False,
    force: force_option("Start over in an OUTPUT that already holds a run.") = False,
    log_every: Annotated[int, typer.Option(min=1, rich_help_panel=OUTPUT, help="Steps between progress updates (and host syncs).")] = 25,
    no_report: flag("--no-report", help="Do not draw report.png and report.html at the end.", panel=OUTPUT) = False,
    tensorboard: flag("--tensorboard", help="Also log scalars and grids to OUTPUT/tensorboard (needs: pip install tensorboard).", panel=OUTPUT) = False,
    as_json: Json = False,
    quiet: Quiet = False,
    device: Device = "auto",
    precision: Annotated[Precision, typer.Option(case_sensitive=False, rich_help_panel=PERFORMANCE, help="auto: bf16 on GPUs that support it and on CPUs with native bf16, else fp32.")] = Precision.auto,
    workers: workers_option("Workers decoding images: processes on Linux from 512 images on, else threads (default: all cores).") = None,
    compile: flag("--compile", help="torch.compile the model (a slower start; not always faster, see BENCHMARKS.md).", panel=PERFORMANCE) = False,
    cache_dir: Annotated[Optional[Path], typer.Option(rich_help_panel=PERFORMANCE, help="Where decoded images are cached for the next run (default: $VAETOOL_CACHE_DIR or ~/.cache/vaetool).")] = None,
    no_disk_cache: flag("--no-disk-cache", help="Keep the decoded images in memory only.", panel=PERFORMANCE) = False,
    cache_memory: Annotated[Optional[int], typer.Option(parser=parse_size, metavar="SIZE", rich_help_panel=PERFORMANCE, help="Above this size (e.g. 4G) the decoded cache is memory-mapped from disk (default: half the available RAM).")] = None,
    no_fit_prior: flag("--no-fit-prior", help="Do not fit a prior to the training images' latents at the end (`vaetool fit-prior` can, later).", panel=OUTPUT) = False,
    prior: Annotated[PriorKind, typer.Option("--prior", case_sensitive=False, rich_help_panel=OUTPUT, help="The prior fitted at the end for `sample`: auto (a second-stage VAE over a spatial model's map, a mixture for a vector latent), mixture, second-stage. With --time the second stage takes the last third of the budget.")] = PriorKind.auto,
    prior_steps: Annotated[Optional[int], typer.Option("--prior-steps", min=1, rich_help_panel=OUTPUT, help="Training steps of the second stage (default: its share of --time, else 4 per training step, at most 3400).")] = None,
) -> None:
    """Train a VAE on a folder of images.

    Writes OUTPUT/model.safetensors (best by validation -ELBO), last.safetensors, state.safetensors (for --resume), metrics.jsonl and per-epoch sample and reconstruction grids, and prints the checkpoint path. --batch-size is per process: under torchrun the global batch is batch-size x processes.
    """
    if recorrupt and not resume:
        corrupt, noise_model = _recorruption(ctx, corrupt, noise_model, likelihood), None
    if (corrupt or noise_model) and not resume:
        model, downsample, latent_channels, beta = _denoiser_model(ctx, model, downsample, latent_channels, beta,
                                                                   supervised=noise_model is None, quiet=quiet)
    if model is ModelKind.spatial and widths and ctx.get_parameter_source("downsample").name == "DEFAULT":
        downsample = 2 ** len(widths)  # the spatial map halves once per width: --widths 64 means f = 2
    if model is ModelKind.spatial:
        check_model_shape(image_size, (0,) * (downsample.bit_length() - 1))
    else:
        check_model_shape(image_size, widths or DEFAULT_WIDTHS[model.value])
    if resume:
        _refuse_ignored_on_resume(ctx, output)
    data = _training_data(ctx, data, output, resume=resume)
    denoiser = bool(corrupt or noise_model)  # tiles at the files' own resolution and mirror images by default
    model_config = ModelConfig(
        kind=model.value, image_size=image_size, channels=3 if channels is Channels.auto else int(channels.value),
        latent_dim=latent_dim, latent_channels=latent_channels, downsample=downsample, level_cells=level_cells,
        widths=tuple(widths or ()), blocks=blocks, patch=patch, likelihood=likelihood.value,
        decoder_scale=decoder_scale.value, fixed_scale=fixed_scale,
        **({} if noise_model is None else dict(zip(("noise_model", "noise_sigma"), parse_noise_model(noise_model)))))
    train_config = TrainConfig(
        epochs=epochs, steps=steps, time_limit=time_budget, batch_size=batch_size, lr=lr,
        lr_schedule=lr_schedule.value, beta=beta,
        kl_warmup_steps=kl_warmup, free_bits=free_bits, val_fraction=val_fraction, seed=seed,
        corruptions=tuple(corrupt or ()), ema=ema, patience=patience, grad_clip=grad_clip, log_every=log_every,
        augment_flip=denoiser if flip is None else flip, patches=denoiser if patches is None else patches)
    _run_train(data, output, model_config=model_config, train_config=train_config, device=device,
               precision=precision.value, detect_channels=channels is Channels.auto, resume=resume, force=force,
               strict=strict, cache_dir=None if no_disk_cache else (cache_dir or _default_cache_dir()),
               cache_memory=cache_memory, compile=compile, workers=workers, report=not no_report,
               tensorboard=tensorboard, quiet=quiet, as_json=as_json, fit_prior=not no_fit_prior, prior=prior.value,
               prior_steps=prior_steps)


def _recorruption(ctx: typer.Context, corrupt: list[Corruption] | None, noise_model: str | None,
                  likelihood: Likelihood) -> list[Corruption]:
    """--recorrupt's one corruption: the noise of --noise-model gaussian[:SIGMA] (0: estimated by the trainer)."""
    if noise_model is None:
        ctx.fail("--recorrupt needs --noise-model gaussian[:SIGMA]: the Gaussian noise the images have, "
                 "its sigma given or estimated from them")
    if corrupt:
        ctx.fail("--recorrupt learns from noisy images and --corrupt from clean ones: give one of them")
    if likelihood is not Likelihood.gaussian:
        ctx.fail("--recorrupt needs --likelihood gaussian: only a squared error is left unbiased by the "
                 "recorrupted target")
    sigma = parse_noise_model(noise_model)[1]
    return [Corruption("recorrupt", sigma, sigma)]


def _denoiser_model(ctx: typer.Context, model: ModelKind, downsample: int, latent_channels: int, beta: float, *,
                    supervised: bool, quiet: bool) -> tuple[ModelKind, int, int, float]:
    """A denoiser's family, latent shape (config.DENOISER_DEFAULTS) and, trained on clean images, KL weight
    (config.SUPERVISED_DENOISER_BETA), for each of them the user left unset.

    The shape applies only to the spatial family, and the downsampling only without --widths (which fix it).
    """
    def unset(name: str) -> bool:
        return ctx.get_parameter_source(name).name == "DEFAULT"

    chosen = []
    if unset("model"):
        model = ModelKind(DENOISER_DEFAULTS["kind"])
        chosen.append(f"--model {model.value}")
    if model.value == DENOISER_DEFAULTS["kind"]:
        if unset("downsample") and unset("widths"):
            downsample = DENOISER_DEFAULTS["downsample"]
            chosen.append(f"--downsample {downsample}")
        if unset("latent_channels"):
            latent_channels = DENOISER_DEFAULTS["latent_channels"]
            chosen.append(f"--latent-channels {latent_channels}")
    if supervised and unset("beta"):
        beta = SUPERVISED_DENOISER_BETA
        chosen.append(f"--beta {beta:g}")
    if chosen:
        info(f"denoiser defaults: {' '.join(chosen)} (chosen with --corrupt or --noise-model when not given)",
             quiet=quiet)
    return model, downsample, latent_channels, beta


def _refuse_ignored_on_resume(ctx: typer.Context, output: Path) -> None:
    """Exit 2 naming each model or training option given with --resume whose value differs from the run's own.

    The same value again is accepted, so a user may re-run the very command with --resume added.
    """
    stored = _stored_configs(output / "state.safetensors")
    if stored is None:
        return  # nothing to compare with: the trainer says there is nothing to resume
    conflicts = []
    for param in ctx.command.params:
        if param.name not in RESUME_IGNORES or ctx.get_parameter_source(param.name).name == "DEFAULT":
            continue
        section, key = RESUME_IGNORES[param.name]
        given, kept = _comparable(ctx.params[param.name]), stored.get(section, {}).get(key)
        if param.name == "noise_model":  # the kind (sigma may be estimated); a recorrupted run's model has none
            given = "none" if ctx.params.get("recorrupt") else parse_noise_model(given)[0]
        if given != kept and not (param.name == "channels" and given == "auto"):
            if isinstance(given, bool) and param.secondary_opts:  # an on/off pair: name the flag given, and the run's
                flags = (param.secondary_opts[0], param.opts[0])
                conflicts.append(f"{flags[given]} (the run used {flags[bool(kept)]})")
            else:
                conflicts.append(f"{max(param.opts, key=len)} (the run has {_shown(kept)}, not {_shown(given)})")
    stored_corruptions = stored.get("train_config", {}).get("corruptions") or []
    if ctx.params.get("recorrupt") and not any(c.get("kind") == "recorrupt" for c in stored_corruptions):
        conflicts.append("--recorrupt (the run was not recorrupted)")
    if conflicts:
        ctx.fail(f"--resume uses the run's own config; drop {', '.join(conflicts)}")


def _comparable(value: Any) -> Any:
    """A CLI value in the form the stored config's JSON holds it."""
    if isinstance(value, Channels):
        return value.value if value is Channels.auto else int(value.value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [dataclasses.asdict(v) if isinstance(v, Corruption) else v for v in value]
    return value


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(Corruption(**v)) if isinstance(v, dict) else str(v) for v in value) or "none"
    return str(value)


def _stored_configs(state: Path) -> dict[str, Any] | None:
    """The model and training config a run's resume state holds, read from the safetensors header without torch.

    A safetensors file opens with the length of its JSON header (8 bytes, little-endian); the header's
    `__metadata__.info` is what `checkpoint.save_state` wrote.
    """
    try:
        with state.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length < 1 << 26 else {}
        info = json.loads(header["__metadata__"]["info"])
        return {"model_config": info["model_config"], "train_config": info["train_config"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _training_data(ctx: typer.Context, data: list[str] | None, output: Path, *, resume: bool) -> list[str]:
    """DATA as given; with --resume and no DATA, the data folders the run recorded in OUTPUT/run.json."""
    if data:
        return data
    if not resume:
        ctx.fail("Missing argument 'DATA': the image files or folders to train on")
    recorded = _recorded_data(output / RUN_RECORD)
    if recorded is None:
        ctx.fail(f"--resume without DATA needs {output / RUN_RECORD} to name the run's data; give DATA")
    return recorded


def _recorded_data(path: Path) -> list[str] | None:
    """The `data` list of a run record, or None when there is no readable record naming it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    data = record.get("data") if isinstance(record, dict) else None
    if isinstance(data, list) and data and all(isinstance(item, str) for item in data):
        return data
    return None


def _default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("VAETOOL_CACHE_DIR") or Path.home() / ".cache" / "vaetool")


def _run_train(data: list[str], output: Path, *, model_config: ModelConfig, train_config: TrainConfig, device: str,
               precision: str, detect_channels: bool, resume: bool, force: bool, strict: bool,
               cache_dir: Path | None, cache_memory: int | None, compile: bool, workers: int | None, report: bool,
               tensorboard: bool, quiet: bool, as_json: bool, fit_prior: bool = True, prior: str = "auto",
               prior_steps: int | None = None) -> None:
    import os

    from ..training.data import paths_from_stdin
    from ..training.trainer import train as run

    if data == ["-"]:
        import sys
        data = paths_from_stdin(sys.stdin)
    display = _TrainDisplay(quiet)
    callback = display
    if tensorboard:
        from ..training.tboard import tensorboard_callback

        callback = tensorboard_callback(output, inner=display)
    interrupted = False
    try:
        result = run(data, output, model_config=model_config, train_config=train_config, device=device,
                     precision=precision, detect_channels=detect_channels, resume=resume, force=force, strict=strict,
                     cache_dir=cache_dir, cache_memory=cache_memory, compile=compile, workers=workers, report=report,
                     callback=callback, invocation=_invocation(data, model_config, train_config, device=device,
                                                               precision=precision), fit_prior=fit_prior,
                     prior=prior, prior_steps=prior_steps)
    except KeyboardInterrupt:
        display.close()
        if display.state_saved:
            warn(f"interrupted; resumable state saved in {output} (continue with --resume)")
        else:
            warn("interrupted before the first training step; nothing to resume, start again without --resume"
                 if not resume else f"interrupted before training went on; {output} is as it was")
        interrupted = True
    finally:
        display.close()
        if callback is not display:
            callback.close()
    if interrupted:  # the warning above is the one message; raised outside the except, so not "error: interrupted"
        raise typer.Exit(EXIT_INTERRUPTED)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    info(f"done: {result.describe()}", quiet=quiet)
    if as_json:
        emit(result.to_dict(), as_json=True)
    else:
        emit(result.checkpoint)


def _invocation(data: list[str], model_config: ModelConfig, train_config: TrainConfig, *, device: str,
                precision: str) -> dict[str, Any]:
    """The command line and the settings it asked for, for the run's record."""
    import shlex
    import sys

    return {"command": shlex.join(["vaetool", *sys.argv[1:]]), "data": list(data), "device": device,
            "precision": precision, "model_config": model_config.to_dict(), "train_config": train_config.to_dict()}


def info_command(
    checkpoint: Checkpoint,
    as_json: Json = False,
) -> None:
    """Show a checkpoint's configuration, size and training summary."""
    from ..inference.describe import checkpoint_summary

    summary = checkpoint_summary(checkpoint)
    if as_json:
        emit(summary, as_json=True)
        return
    _print_info(summary)


def _prior_line(prior: dict[str, Any] | None) -> str:
    if prior is None:
        return "none: samples come from N(0, I) (`vaetool fit-prior` fits one)"
    if prior.get("kind") == "second-stage":
        return (f"second stage over latent {prior['level']} {tuple(prior['shape'])}: a VAE of {prior['steps']} steps "
                f"with {prior['code_size']}-number codes, and a mixture of {prior['components']} component(s) over "
                f"them (held-out log-likelihood {prior['held_out_log_likelihood']:.2f} nats per code)")
    reduced = f" in its top {prior['reduced_dims']} principal directions" if prior["reduced_dims"] else ""
    return (f"fitted, {prior['components']} component(s) over latent {prior['level']} {tuple(prior['shape'])}{reduced}; "
            f"held-out log-likelihood {prior['held_out_log_likelihood']:.2f} nats per latent")


def _print_info(s: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [
        ("checkpoint", s["path"]),
        ("format", f"vaetool checkpoint v{s['format_version']} (vaetool {s['vaetool_version']}, {s['created']})"),
        ("parameters", f"{s['parameters']:,}"), ("identity", s["identity"]), ("family", s["family"]),
        ("latents", ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in s["levels"].items()))]
    rows += [(f"model.{k}", v) for k, v in s["model"].items()]
    training = s["training"] or {}
    rows += [(f"training.{k}", training[k]) for k in ("step", "epoch", "images", "train_images", "val_images",
                                                      "world_size", "global_batch") if k in training]
    metrics = training.get("metrics") or {}
    rows += [(f"metric.{k}", f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()]
    if s["train"]:
        rows += [(f"train.{k}", _setting(k, v)) for k, v in s["train"].items() if v not in (None, [], ())]
    rows.append(("prior", _prior_line(s["prior"])))
    width = max(len(name) for name, _ in rows) + 2  # one column of names, however long
    lines = [f"{name:<{width}}{value}" for name, value in rows]
    emit("\n".join(lines))
