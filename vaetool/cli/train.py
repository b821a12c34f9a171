"""`vaetool train` and `vaetool info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import (EXIT_INTERRUPTED, Checkpoint, Device, Json, Quiet, Seed, emit, handle_errors, info,
                     make_progress, parse_duration, positive, warn)


def _parse_size(text: str | None) -> int | None:
    """`512M`, `4G`, `1.5g`, `1000000` -> bytes."""
    if text is None:
        return None
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().rstrip("b")
    unit = raw[-1] if raw and raw[-1] in units else ""
    try:
        value = float(raw[: len(raw) - len(unit)]) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"cannot read size {text!r}; write e.g. 512M or 4G") from None
    if value < 0:
        raise typer.BadParameter("the size must be >= 0")
    return int(value)


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise typer.BadParameter(f"cannot read widths {text!r}; write e.g. 32,64,128,256") from None
    if not widths or min(widths) < 1:
        raise typer.BadParameter("widths must be positive integers")
    return widths


class _TrainDisplay:
    """Turns the trainer's events into a progress bar (terminal) or one line per epoch (logs)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = make_progress(quiet)
        self.task = None
        self.time_limit: float | None = None
        self.failed = 0
        self.state_saved = False  # set when an interrupted run has written its resume state

    def __call__(self, event: Any) -> None:
        from ..events import Epoch, Failed, Progress, Saved, Started, Warning

        if isinstance(event, Started):
            self.on_started(event)
        elif isinstance(event, Progress) and self.task is not None:
            self.on_progress(event)
        elif isinstance(event, Epoch):
            self.on_epoch(event.metrics)
        elif isinstance(event, Failed):
            self.failed += 1
            warn(f"skipped {event.input}: {event.reason}")
        elif isinstance(event, Warning):
            warn(event.message)
        elif isinstance(event, Saved):
            self.state_saved = self.state_saved or event.reason == "interrupted"

    def on_started(self, event: Any) -> None:
        self.progress.start()
        if event.command != "train":  # decoding the images into the cache
            self.task = self.progress.add_task(event.command, total=event.total, status="")
            return
        d, cfg = event.info, event.info["config"]
        if self.failed:
            warn(f"{self.failed} file(s) could not be read and were skipped")
        cache = "reused on-disk cache" if d["cache_reused"] else ("memory-mapped cache" if d["cache_on_disk"] else "in-memory cache")
        info(f"{d['train']} training and {d['val']} validation images ({cache}); model {cfg['image_size']}px "
             f"x{cfg['channels']}, latent {cfg['latent_dim']}, widths {cfg['widths']}, {cfg['likelihood']} "
             f"likelihood; batch {d['batch']} per process x {d['world']} = {d['global_batch']}; "
             f"device {d['device']} ({d['precision']})", quiet=self.quiet)
        self.time_limit = d["time_limit"]
        self.task = self.progress.add_task("train", total=event.total, completed=d["start_step"], status="")

    def on_progress(self, event: Any) -> None:
        m, total = event.metrics, event.total
        if not m:  # the cache's progress
            self.progress.update(self.task, completed=event.done, total=total)
            return
        if self.time_limit and 0 < m["budget"] < 1:  # a time budget: the steps that fit in the time left
            by_time = int(event.done / m["budget"])
            total = min(total, by_time) if total else by_time
        status = (f"ep {m['epoch']} loss {m['loss']:.1f} rec {m['recon']:.1f} kl {m['kl']:.1f} "
                  f"{m['images_per_s']:.0f} img/s")
        self.progress.update(self.task, completed=event.done, total=total, status=status)

    def on_epoch(self, d: dict[str, Any]) -> None:
        val = (f" val -elbo {d['val_neg_elbo']:.1f} psnr {d['val_psnr']:.2f}dB" if "val_neg_elbo" in d else "")
        mark = " *" if d.get("best") else ""
        line = (f"epoch {d['epoch']} step {d['step']}: loss {d['train_loss']:.1f} (rec {d['train_recon']:.1f}, "
                f"kl {d['train_kl']:.1f}){val}{mark}")
        if self.progress.live.is_started and not self.progress.disable:
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            info(line, quiet=self.quiet)

    def close(self) -> None:
        self.progress.stop()


def train(
    data: Annotated[list[str], typer.Argument(help="Image files or folders (recursive), or - to read paths from stdin.",
                                              show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder for checkpoints, metrics and grids.")],
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Passes over the data (default 30 when no budget is given).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps in total.")] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time", help="Wall-clock budget for this invocation, e.g. 90s, 10m, 2h.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per optimiser step per process; under torchrun the global batch is this x the number of processes.")] = 64,
    lr: Annotated[float, typer.Option(callback=positive, help="AdamW learning rate (reached after 20 warm-up steps).")] = 2e-3,
    seed: Seed = 0,
    device: Device = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on GPUs that support it and on CPUs with native bf16, else fp32), fp32, bf16, fp16.")] = "auto",
    image_size: Annotated[int, typer.Option(min=1, help="Images are resized and centre-cropped to this square size.")] = 64,
    channels: Annotated[str, typer.Option(help="auto (1 if every image is grayscale, else 3), 1 or 3.")] = "auto",
    latent_dim: Annotated[int, typer.Option(min=1, help="Size of the latent vector z.")] = 64,
    widths: Annotated[str, typer.Option(help="Channels of each stride-2 stage, comma separated; image size must be a multiple of 2**stages.")] = "32,64,128,256",
    blocks: Annotated[int, typer.Option(min=0, help="Extra residual conv layers per stage.")] = 1,
    patch: Annotated[int, typer.Option(min=1, max=2, help="2: fold 2x2 pixel patches into channels before the first stage (faster on CPUs); 1: a stride-2 conv.")] = 2,
    likelihood: Annotated[str, typer.Option(help="Decoder distribution: gaussian, laplace or bernoulli.")] = "gaussian",
    decoder_scale: Annotated[str, typer.Option(help="Gaussian/Laplace scale: optimal (its closed-form maximum-likelihood value per batch, sigma-VAE), learned, or fixed.")] = "optimal",
    fixed_scale: Annotated[float, typer.Option(callback=positive, help="Decoder std with --decoder-scale fixed (0.1 = MSE weighted by 50).")] = 0.1,
    beta: Annotated[float, typer.Option(min=0.0, help="KL weight; 1 is the true ELBO (no tuning needed with the calibrated decoder scale); 0 trains a plain autoencoder.")] = 1.0,
    kl_warmup: Annotated[int, typer.Option(min=0, help="Steps over which beta rises linearly from 0.")] = 0,
    free_bits: Annotated[float, typer.Option(min=0.0, help="Minimum KL per latent dimension, nats (batch average).")] = 0.0,
    corrupt: Annotated[Optional[list[str]], typer.Option(help="Train as a denoiser: gaussian:STD, gaussian:LO-HI, mask:FRACTION, saltpepper:FRACTION; repeat to combine.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of images held out for validation.")] = 0.05,
    ema: Annotated[float, typer.Option(min=0.0, max=0.99999, help="EMA decay of the weights (e.g. 0.999); the EMA weights are evaluated and saved.")] = 0.0,
    patience: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many epochs without a better validation -ELBO.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Random horizontal flips.")] = False,
    grad_clip: Annotated[float, typer.Option(callback=positive, help="Clip the gradient norm to this.")] = 100.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUTPUT exactly where it stopped.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Start over in an OUTPUT that already holds a run.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first unreadable image instead of skipping it.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where decoded images are cached for the next run (default: $VAETOOL_CACHE_DIR or ~/.cache/vaetool).")] = None,
    no_disk_cache: Annotated[bool, typer.Option("--no-disk-cache", help="Keep the decoded images in memory only.")] = False,
    cache_memory: Annotated[Optional[str], typer.Option(help="Above this size (e.g. 4G) the decoded cache is memory-mapped from disk (default: half the available RAM).")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Workers decoding images: processes on Linux from 512 images on, else threads (default: all cores).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (slower start; on a 2-core CPU it ran slower than eager, see BENCHMARKS.md).")] = False,
    log_every: Annotated[int, typer.Option(min=1, help="Steps between progress updates (and host syncs).")] = 25,
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not draw report.png and report.html at the end.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log scalars and grids to OUTPUT/tensorboard (needs: pip install tensorboard).")] = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Train a VAE on a folder of images.

    Writes OUTPUT/model.safetensors (best by validation -ELBO), last.safetensors, state.safetensors (for --resume), metrics.jsonl and per-epoch sample and reconstruction grids, and prints the checkpoint path. --batch-size is per process: under torchrun the global batch is batch-size x processes.
    """
    seconds = parse_duration(time_budget)
    memory = _parse_size(cache_memory)
    if channels not in ("auto", "1", "3"):
        raise typer.BadParameter("channels must be auto, 1 or 3", param_hint="--channels")
    widths_tuple = _parse_widths(widths)
    with handle_errors():
        _run_train(locals() | {"seconds": seconds, "memory": memory, "widths_tuple": widths_tuple})


def _run_train(o: dict[str, Any]) -> None:
    import os

    from ..config import Corruption, ModelConfig, TrainConfig
    from ..io.images import find_images
    from ..training.trainer import train as run

    data = o["data"]
    if data == ["-"]:
        import sys
        data = [str(f.path) for f in find_images(["-"], stdin=sys.stdin)]
    model_config = ModelConfig(
        image_size=o["image_size"], channels=3 if o["channels"] == "auto" else int(o["channels"]),
        latent_dim=o["latent_dim"], widths=o["widths_tuple"], blocks=o["blocks"], patch=o["patch"], likelihood=o["likelihood"],
        decoder_scale=o["decoder_scale"], fixed_scale=o["fixed_scale"])
    train_config = TrainConfig(
        epochs=o["epochs"], steps=o["steps"], time_limit=o["seconds"], batch_size=o["batch_size"], lr=o["lr"],
        beta=o["beta"], kl_warmup_steps=o["kl_warmup"], free_bits=o["free_bits"], val_fraction=o["val_fraction"],
        seed=o["seed"], corruptions=tuple(Corruption.parse(c) for c in o["corrupt"] or []), ema=o["ema"],
        patience=o["patience"], augment_flip=o["flip"], grad_clip=o["grad_clip"], log_every=o["log_every"])
    cache_dir = None if o["no_disk_cache"] else (
        o["cache_dir"] or Path(os.environ.get("VAETOOL_CACHE_DIR") or Path.home() / ".cache" / "vaetool"))
    display = _TrainDisplay(o["quiet"])
    callback = display
    if o["tensorboard"]:
        from ..training.tboard import tensorboard_callback

        callback = tensorboard_callback(o["output"], inner=display)
    interrupted = False
    try:
        result = run(data, o["output"], model_config=model_config, train_config=train_config, device=o["device"],
                     precision=o["precision"], detect_channels=o["channels"] == "auto", resume=o["resume"],
                     force=o["force"], strict=o["strict"], cache_dir=cache_dir, cache_memory=o["memory"],
                     compile=o["compile"], workers=o["workers"], report=not o["no_report"],
                     callback=callback, invocation=_invocation(o))
    except KeyboardInterrupt:
        display.close()
        if display.state_saved:
            warn(f"interrupted; resumable state saved in {o['output']} (continue with --resume)")
        else:
            warn("interrupted before the first training step; nothing to resume, start again without --resume"
                 if not o["resume"] else f"interrupted before training went on; {o['output']} is as it was")
        interrupted = True
    finally:
        display.close()
        if callback is not display:
            callback.close()
    if interrupted:  # the warning above is the one message; raised outside the except, so not "error: interrupted"
        raise typer.Exit(EXIT_INTERRUPTED)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    info(f"done: {result.describe()}", quiet=o["quiet"])
    if o["as_json"]:
        emit(result.to_dict(), as_json=True)
    else:
        emit(result.checkpoint)


def _invocation(o: dict[str, Any]) -> dict[str, Any]:
    """The command line and the options as parsed, for the run's record."""
    import shlex
    import sys

    skip = {"data", "seconds", "memory", "widths_tuple"}
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in o.items() if k not in skip}
    return {"command": shlex.join(["vaetool", *sys.argv[1:]]), "options": options}


def info_command(
    checkpoint: Checkpoint,
    as_json: Json = False,
) -> None:
    """Show a checkpoint's configuration, size and training summary."""
    with handle_errors():
        from ..checkpoint import load_model
        from ..models.base import count_parameters

        loaded = load_model(checkpoint)
        summary = {
            "path": str(loaded.path), "format_version": int(loaded.metadata.get("format_version", 0)),
            "vaetool_version": loaded.metadata.get("vaetool_version"), "created": loaded.metadata.get("created"),
            "parameters": count_parameters(loaded.model), "identity": loaded.identity,
            "model": loaded.config.to_dict(),
            "train": loaded.train_config.to_dict() if loaded.train_config else None,
            "training": loaded.training,
        }
        if as_json:
            emit(summary, as_json=True)
            return
        _print_info(summary)


def _print_info(s: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [
        ("checkpoint", s["path"]),
        ("format", f"vaetool checkpoint v{s['format_version']} (vaetool {s['vaetool_version']}, {s['created']})"),
        ("parameters", f"{s['parameters']:,}"), ("identity", s["identity"])]
    rows += [(f"model.{k}", v) for k, v in s["model"].items()]
    training = s["training"] or {}
    rows += [(f"training.{k}", training[k]) for k in ("step", "epoch", "images", "train_images", "val_images",
                                                      "world_size", "global_batch") if k in training]
    metrics = training.get("metrics") or {}
    rows += [(f"metric.{k}", f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()]
    if s["train"]:
        rows += [(f"train.{k}", v) for k, v in s["train"].items() if v not in (None, [], ())]
    width = max(len(name) for name, _ in rows) + 2  # one column of names, however long
    lines = [f"{name:<{width}}{value}" for name, value in rows]
    emit("\n".join(lines))
