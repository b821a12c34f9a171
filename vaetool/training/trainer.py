"""The training loop: one process or DDP under torchrun, resumable, reporting through events."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import DEFAULT_KIND, ModelConfig, TrainConfig
from ..errors import DivergenceError, OutputError
from ..events import Callback, Epoch, Progress, Saved, Started, Warning, ignore
from ..io.decode import detect_channels as detect_image_channels, to_float
from ..io.find import find_images
from ..io.atomic import check_writable_dir
from ..models.base import build_model, elbo_loss
from ..runtime import BatchGatherer, autocast, precision_name, prepare, resolve_device, resolve_precision
from .corrupt import global_rand, global_randn, step_generator, training_pair
from .data import Split, default_cache_memory, load_cache, split_data
from .distributed import World, all_reduce_sum, barrier, broadcast_value, global_mean, init_world, shutdown
from .epoch import MetricsLog, draw_grids, kl_spike, nonfinite_tensor, save_checkpoints, validate
from .fit_prior import SECOND_STAGE_SHARE, fit_run_priors, planned_prior
from .second_stage import STEPS as SECOND_STAGE_STEPS
from .interrupts import StepGuard
from .noise import fit_noise_model, fit_recorruption
from .schedule import budget_fraction, kl_weight, learning_rate
from .state import Counters, ResumeState, run_record, save_state, write_run_record
from .summary import SteadySpeed, TrainResult, start_info, write_report_safely

DEFAULT_EPOCHS = 30
SECOND_STAGE_PER_STEP = 4  # a second-stage step costs a fraction of a training step (BENCHMARKS.md)
PROGRESS_SECONDS = 1.0  # the longest the progress bar waits for news

__all__ = ["train", "TrainResult", "make_optimizer", "update_ema", "default_cache_memory", "DEFAULT_EPOCHS"]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW: fused into one kernel on CUDA, the multi-tensor (foreach) version elsewhere.

    The fused CPU version is a little faster but did not resume bit-exactly, and exact resume is worth more.
    """
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kind)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, *, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers (the decoder scale) are copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def train(data: Sequence[str | Path], run_dir: str | Path, *, model_config: ModelConfig | None = None,
          train_config: TrainConfig | None = None, device: str = "auto", precision: str = "auto",
          detect_channels: bool = True, resume: bool = False, force: bool = False, strict: bool = False,
          cache_dir: str | Path | None = None, cache_memory: int | None = None, compile: bool = False,
          workers: int | None = None, report: bool = True, callback: Callback | None = None,
          invocation: dict[str, Any] | None = None, fit_prior: bool = True, prior: str = "auto",
          prior_steps: int | None = None) -> TrainResult:
    """Train a VAE family on the images under `data`; write checkpoints, metrics and grids to `run_dir`.

    Under torchrun each process trains on its shard of every batch with DDP and only rank 0 writes;
    at the end it draws `report.png` and `report.html` unless `report` is False. `callback` receives
    the events of `vaetool.events` (rank 0 only). `invocation` (the command line and options, say)
    is kept in the run's `run.json` and checkpoints beside the data folders, device and precision.
    With `fit_prior`, a prior fitted to the training images' posterior means is stored in the run's
    checkpoints at the end (training/fit_prior.py): of kind `prior` (auto, mixture, second-stage); a
    second stage trains `prior_steps` steps, or with a time limit its share of the time.
    """
    started = time.monotonic()
    resolved = resolve_device(device)
    world = init_world(resolved.type)
    try:
        trainer = Trainer(data, Path(run_dir), world=world, device=resolved, precision=precision,
                          model_config=model_config or ModelConfig(kind=DEFAULT_KIND),
                          train_config=train_config or TrainConfig(),
                          detect_channels=detect_channels, resume=resume, force=force, strict=strict,
                          cache_dir=cache_dir, cache_memory=cache_memory, compile=compile, workers=workers,
                          callback=callback or ignore, invocation=invocation,
                          prior=prior if fit_prior else "none", prior_steps=prior_steps)
        return trainer.run(report=report, started=started)
    finally:
        shutdown(world)


def _check_run_dir(run_dir: Path, *, resume: bool, force: bool, world: World) -> bool:
    """Refuse to resume nothing or to overwrite a run by accident; whether an older run is there."""
    existing = (run_dir / ckpt.MODEL_FILE).exists() or (run_dir / ckpt.STATE_FILE).exists()
    if resume and not (run_dir / ckpt.STATE_FILE).exists():
        raise OutputError(f"{run_dir} has no {ckpt.STATE_FILE} to resume from; start without --resume")
    if existing and not (resume or force):
        raise OutputError(f"{run_dir} already holds a run; pass --resume to continue it or --force to start over")
    if world.is_main:
        check_writable_dir(run_dir / "grids")  # a read-only or full disk shows now, not after an epoch
    return existing


class Trainer:
    """One training run. Every piece of state is set in `__init__`; `run()` is the loop, top to bottom."""

    def __init__(self, data: Sequence[str | Path], run_dir: Path, *, world: World, device: torch.device,
                 precision: str, model_config: ModelConfig, train_config: TrainConfig, detect_channels: bool,
                 resume: bool, force: bool, strict: bool, cache_dir: str | Path | None, cache_memory: int | None,
                 compile: bool, workers: int | None, callback: Callback, invocation: dict[str, Any] | None,
                 prior: str = "auto", prior_steps: int | None = None) -> None:
        self.run_dir, self.world, self.device = run_dir, world, device
        self.emit: Callback = callback if world.is_main else ignore
        self.amp_dtype = resolve_precision(precision, device, training=True)
        self.gather = BatchGatherer(device)  # pinned, asynchronous host-to-GPU copies on CUDA
        prepare(device)
        existing = _check_run_dir(run_dir, resume=resume, force=force, world=world)
        saved = ResumeState.read(run_dir) if resume else None  # the one read of state.safetensors
        self.model_config = saved.model_config if saved else model_config  # a resumed run keeps its architecture
        found = find_images(data, callback=self.emit)
        if detect_channels and saved is None:
            self.model_config = dataclasses.replace(
                self.model_config, channels=detect_image_channels([f.path for f in found]))
        patches = (saved.train_config if saved else train_config).patches  # a resumed run cuts its images as before
        self.cache = load_cache(found, model_config=self.model_config, world=world, emit=self.emit, strict=strict,
                                cache_dir=cache_dir, cache_memory=cache_memory, workers=workers, patches=patches)
        if saved is None:  # a noise model's sigma, estimated from the images when not given
            self.model_config = fit_noise_model(self.model_config, self.cache.images, emit=self.emit)
        self.config = (_resumed_config(saved.train_config, train_config) if saved
                       else fit_recorruption(train_config, self.cache.images, emit=self.emit))
        self.split: Split = split_data(len(self.cache.paths), self.config, world, groups=self.cache.counts,
                                       warn=lambda message: self.emit(Warning(message)))
        self.counters = saved.counters if saved else Counters()
        self._build_model(saved, compile=compile)
        self.levels = list(self.model.latent_shapes(*self.cache.images.shape[-2:]))  # latent level names
        self.total_steps = self._budget_steps()
        self.prior_kind, self.prior_steps = planned_prior(prior, self.model, emit=self.emit), prior_steps
        # With --time and a second stage, training stops early enough for the second stage to fit in the budget.
        limit = self.config.time_limit
        self.prior_seconds = limit * SECOND_STAGE_SHARE if limit and self.prior_kind == "second-stage" else None
        self.time_limit = limit - self.prior_seconds if self.prior_seconds else limit  # this invocation's training
        self.time_budget = self.counters.elapsed + self.time_limit if self.time_limit else None
        self.metrics_log = MetricsLog(run_dir, fresh=existing and not resume)
        self.record = run_record(data=[str(d) for d in data][:32], device=device, world_size=world.size,
                                 precision=precision_name(self.amp_dtype), invocation=invocation, resumed=resume)
        self.guard = StepGuard()
        self.speed = SteadySpeed(first_step=self.counters.step)
        width = 4 + (len(self.levels) if len(self.levels) > 1 else 0)  # loss, recon, kl, images, kl per level
        self.sums = torch.zeros(width, device=device, dtype=torch.float64)  # since the last progress report
        self.epoch_sums = torch.zeros_like(self.sums)
        self.check_every = self.config.log_every if (world.distributed or device.type != "cpu") else 1
        # The clocks start here, right before run(): training time, and this invocation's --time budget.
        self.clock = time.monotonic() - self.counters.elapsed
        self.session_start = self.last_report = time.monotonic()
        self.recent_kl: list[float] = []  # the epochs' mean KL, to tell a spike from progress
        self.elapsed = self.counters.elapsed  # rank 0's training seconds at the last synchronised point

    # ----- set-up -------------------------------------------------------------------------
    def _build_model(self, saved: ResumeState | None, *, compile: bool) -> None:
        """Model, EMA copy, optimizer, gradient scaler and the (DDP, compiled) module that runs the steps."""
        torch.manual_seed(self.config.seed)  # the same seed gives the same initial weights
        self.model = build_model(self.model_config)
        self.model.reduce_mean = global_mean  # the decoder scale and free bits see the global batch
        if saved:
            self.model.load_state_dict(saved.weights("model."))
        self.model.to(self.device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval() if self.config.ema > 0 else None
        if self.ema is not None and saved:
            self.ema.load_state_dict(saved.weights("ema."))
        self.eval_model = self.ema if self.ema is not None else self.model  # validated, drawn and saved
        self.optimizer = make_optimizer(self.model, lr=self.config.lr, weight_decay=self.config.weight_decay,
                                        device=self.device)
        if saved:
            ckpt.restore_optimizer(self.optimizer, saved.tensors, saved.optimizer_groups)
        # fp16 needs loss scaling; bf16 and float32 do not, and a disabled scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.net: nn.Module = self.model
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if compile:
            self.net = torch.compile(self.net)

    def _budget_steps(self) -> int | None:
        cfg, per_epoch = self.config, self.split.steps_per_epoch
        limits = [cfg.steps] if cfg.steps else []
        if cfg.epochs or not (cfg.steps or cfg.time_limit):
            limits.append((cfg.epochs or DEFAULT_EPOCHS) * per_epoch)
        return min(limits) if limits else None

    # ----- the loop -----------------------------------------------------------------------
    def run(self, *, report: bool, started: float) -> TrainResult:
        """Train epoch after epoch until the budget or the patience runs out; Ctrl-C saves a resumable state."""
        self.emit(Started("train", self.total_steps, "steps", start_info(self)))
        if self.world.is_main:
            write_run_record(self.run_dir, self.record)
        stopped, metrics = "budget", {}
        try:
            with self.guard:
                while True:
                    finished = self._train_epoch()
                    metrics = self._end_epoch(partial=not finished)
                    if self._out_of_budget():
                        break
                    if self.config.patience and self.counters.bad_epochs >= self.config.patience:
                        stopped = "early-stop"
                        break
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        prior = None
        if self.prior_kind and self.world.is_main:  # the other processes wait at the barrier: the fit is rank 0's
            prior = fit_run_priors(self.run_dir, self.cache.images, self.split.train_index, batch=self.split.batch,
                                   seed=self.config.seed, device=self.device, flip=self.config.augment_flip,
                                   kind=self.prior_kind, steps=self._second_stage_steps(), seconds=self.prior_seconds,
                                   amp=self.amp_dtype, emit=self.emit)
        report_path = write_report_safely(self.run_dir, self.emit) if report and self.world.is_main else None
        barrier(self.world)
        return TrainResult.of(self, stopped=stopped, metrics=metrics, report=report_path,
                              wall_s=time.monotonic() - started, prior=prior.describe() if prior else None)

    def _second_stage_steps(self) -> int | None:
        """--prior-steps; else with --time the second stage's share of it (None); else SECOND_STAGE_PER_STEP
        second-stage steps per training step, at most SECOND_STAGE_STEPS: deterministic, and a short run
        (a test, a try) does not wait minutes for its prior."""
        if self.prior_steps or self.prior_seconds:
            return self.prior_steps
        return max(1, min(SECOND_STAGE_STEPS, SECOND_STAGE_PER_STEP * self.counters.step))

    def _train_epoch(self) -> bool:
        """Train until the epoch ends (True) or the budget runs out mid-epoch (False)."""
        c, split = self.counters, self.split
        order = self._epoch_order(c.epoch)
        self.model.train()
        self.epoch_sums.zero_()
        self.speed.tick(c.step, time.monotonic())
        while c.step_in_epoch < split.steps_per_epoch:
            start = c.step_in_epoch * split.global_batch + self.world.rank * split.batch
            with self.guard.step():
                self._train_step(order[start: start + split.batch])
                c.step += 1
                c.step_in_epoch += 1
            last_of_epoch = c.step_in_epoch == split.steps_per_epoch
            if c.step % self.config.log_every == 0 or last_of_epoch or self._report_due():
                self._report_progress()
            elif c.step % self.check_every == 0:
                self._check_loss()
            if c.step % self.check_every == 0 or last_of_epoch:
                self.speed.tick(c.step, time.monotonic())  # just synchronised: the time is the work's
            if not last_of_epoch and c.step % self.check_every == 0 and self._out_of_budget():
                return False
        c.epoch += 1
        c.step_in_epoch = 0
        return True

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        # The order depends only on (seed, epoch): a resumed run sees the very same batches.
        generator = torch.Generator().manual_seed(self.config.seed * 7_368_787 + epoch + 1)
        train_index = self.split.train_index
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        return order[: self.split.steps_per_epoch * self.split.global_batch]

    def _fraction(self) -> float:
        return budget_fraction(step=self.counters.step, total_steps=self.total_steps, elapsed=self.elapsed,
                               time_budget=self.time_budget)

    def _train_step(self, index: torch.Tensor) -> None:
        """One optimiser step on this process's rows of the global batch."""
        cfg, c, split = self.config, self.counters, self.split
        rows = slice(self.world.rank * split.batch, (self.world.rank + 1) * split.batch)
        generator = step_generator(cfg.seed, c.step, self.device)  # all noise of a step from (seed, step)
        x = to_float(self.gather(self.cache.images, index)).contiguous(memory_format=torch.channels_last)
        if cfg.augment_flip:
            flip = global_rand((split.global_batch,), generator=generator, rows=rows, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, C, H, W)
        noisy, target = training_pair(x, cfg.corruptions, generator=generator, global_batch=split.global_batch,
                                      rows=rows)
        noise = {name: global_randn((split.global_batch, *shape), generator=generator, rows=rows, device=self.device)
                 for name, shape in self.model.latent_shapes(*x.shape[-2:]).items()}  # level -> (B, ...)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step=c.step, fraction=self._fraction())
        with autocast(self.device, self.amp_dtype):
            out = self.net(noisy, sample=cfg.beta > 0, noise=noise)
        terms = elbo_loss(self.model, target, out, beta=kl_weight(cfg, step=c.step), free_bits=cfg.free_bits)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)  # fp16: skipped when the scaled gradient overflowed
        self.scaler.update()
        if self.ema is not None:
            update_ema(self.ema, self.model, decay=cfg.ema)
        parts = [terms.loss.detach().double() * len(index), terms.recon.sum().double(), terms.kl.sum().double(),
                 torch.tensor(float(len(index)), device=self.device, dtype=torch.float64)]
        if len(self.levels) > 1:
            parts += [terms.kl_levels[name].sum().double() for name in self.levels]
        self.sums += torch.stack(parts)

    def _out_of_budget(self) -> bool:
        """Synchronise rank 0's clock with every process and say whether a budget is spent."""
        self.elapsed = broadcast_value(time.monotonic() - self.clock, self.world, self.device)
        session = self.elapsed - (self.session_start - self.clock)
        limit, total = self.time_limit, self.total_steps
        return (total is not None and self.counters.step >= total) or (limit is not None and session >= limit)

    def _check_loss(self) -> None:
        if not bool(torch.isfinite(self.sums[0])):
            self._diverged("the loss became NaN or infinite")

    def _diverged(self, what: str) -> None:
        good = self.run_dir / ckpt.MODEL_FILE
        kept = f"the last good checkpoint is {good}" if good.exists() else "no checkpoint was saved yet"
        raise DivergenceError(
            f"{what} at step {self.counters.step} ({kept}); lower the learning rate "
            f"(--lr, now {self.config.lr:g}) or the gradient clip (--grad-clip, now {self.config.grad_clip:g})")

    def _report_due(self) -> bool:
        # A bar that moves about once a second whatever --log-every says; one process only, because under
        # DDP every rank must take part in the report's reduction at the same step.
        return not self.world.distributed and time.monotonic() - self.last_report >= PROGRESS_SECONDS

    def _report_progress(self) -> None:
        """Reduce the sums since the last report over processes and send them as one Progress event."""
        self.last_report = time.monotonic()
        sums = all_reduce_sum(self.sums.clone(), self.world).tolist()
        if not all(math.isfinite(v) for v in sums):
            self._diverged("the loss became NaN or infinite")
        self.epoch_sums += self.sums
        self.sums.zero_()
        count, c = max(sums[3], 1.0), self.counters
        metrics = {"loss": sums[0] / count, "recon": sums[1] / count, "kl": sums[2] / count,
                   "lr": self.optimizer.param_groups[0]["lr"], "beta": kl_weight(self.config, step=c.step - 1),
                   "epoch": c.epoch + 1, "elapsed": time.monotonic() - self.clock, "budget": self._fraction(),
                   "images_per_s": self.speed.recent(c.step, time.monotonic(), self.split.global_batch)}
        if len(self.levels) > 1:
            metrics.update({f"kl_{name}": value / count for name, value in zip(self.levels, sums[4:])})
        self.emit(Progress(c.step, self.total_steps, metrics))

    # ----- the end of an epoch --------------------------------------------------------------
    def _end_epoch(self, *, partial: bool) -> dict[str, Any]:
        """Validate, keep the best, save checkpoints, state, metrics and grids; report the epoch."""
        c = self.counters
        if float(self.sums[3]) > 0:
            self._report_progress()
        self.speed.pause()
        metrics = self._epoch_metrics(partial=partial)
        bad = nonfinite_tensor(self.model, self.ema)  # the loss was finite before the last update, the weights may not be
        if bad is not None:
            self._diverged(f"the weights became NaN or infinite ({bad})")
        # The best checkpoint is the best at what the run optimises: the -ELBO at --beta 1, recon + beta KL
        # otherwise (by the -ELBO alone a beta 0.1 denoiser's best epoch was its first, 4 dB behind its last).
        score = metrics.get("val_objective", metrics["train_recon"] + self.config.beta * metrics["train_kl"])
        metrics["best"] = score < c.best
        if metrics["best"]:
            c.best, c.bad_epochs, c.best_epoch, c.best_psnr = score, 0, metrics["epoch"], metrics.get("val_psnr")
            c.best_neg_elbo = metrics.get("val_neg_elbo", metrics["train_neg_elbo"])
        elif not partial:
            c.bad_epochs += 1
        if self.world.is_main:
            written = save_checkpoints(self.run_dir, self.eval_model, train_config=self.config,
                                       summary=self._summary(metrics), improved=metrics["best"])
            if len(written) > 1:
                self.emit(Saved(str(written[1]), "best"))
            self._save_state()
            self.metrics_log.append(metrics)
            pool = self.split.val_index if len(self.split.val_index) else self.split.train_index
            draw_grids(self.eval_model, self.cache.images, pool, self.run_dir, seed=self.config.seed,
                       epoch=metrics["epoch"], device=self.device)
        barrier(self.world)
        spike = kl_spike(self.recent_kl[-8:], metrics["train_kl"], epoch=metrics["epoch"])
        if spike:
            self.emit(Warning(spike))
        self.recent_kl.append(metrics["train_kl"])
        self.emit(Epoch(metrics["epoch"], c.step, metrics))
        return metrics

    def _epoch_metrics(self, *, partial: bool) -> dict[str, Any]:
        c = self.counters
        sums = all_reduce_sum(self.epoch_sums.clone(), self.world).tolist()
        count = max(sums[3], 1.0)
        metrics: dict[str, Any] = {
            "epoch": c.epoch if not partial else c.epoch + 1, "step": c.step, "partial": partial,
            "train_loss": sums[0] / count, "train_recon": sums[1] / count, "train_kl": sums[2] / count,
            "train_neg_elbo": (sums[1] + sums[2]) / count, "elapsed": round(time.monotonic() - self.clock, 3),
            "beta": kl_weight(self.config, step=c.step - 1), "lr": self.optimizer.param_groups[0]["lr"],
            "decoder_log_scale": float(self.eval_model.log_scale.detach())}
        if len(self.levels) > 1:
            metrics.update({f"train_kl_{name}": value / count for name, value in zip(self.levels, sums[4:])})
        metrics.update(validate(self.eval_model, self.cache.images, self.split.val_index, batch=self.split.batch,
                                seed=self.config.seed, device=self.device, world=self.world, beta=self.config.beta,
                                corruptions=self.config.corruptions))
        return metrics

    def _summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint says about the training that made it."""
        c, split = self.counters, self.split
        return {"step": c.step, "epoch": c.epoch, "images": self.cache.image_count,
                "train_images": len(split.train_index), "val_images": len(split.val_index),
                "world_size": self.world.size, "global_batch": split.global_batch, "metrics": metrics,
                "run": self.record}

    def _save_state(self) -> None:
        self.counters.elapsed = time.monotonic() - self.clock
        save_state(self.run_dir, model=self.model, ema=self.ema, optimizer=self.optimizer, counters=self.counters,
                   train_config=self.config, model_config=self.model_config)

    def _save_interrupted(self) -> None:
        """Ctrl-C: the state (and a last.safetensors of this point mid-epoch), unless the weights are broken."""
        if not self.world.is_main:
            return
        bad = nonfinite_tensor(self.model, self.ema)
        if bad is not None:
            self._diverged(f"the weights became NaN or infinite ({bad}); interrupted, nothing saved")
        self._save_state()
        if not (self.run_dir / ckpt.LAST_FILE).exists() or self.counters.step_in_epoch:
            ckpt.save_model(self.run_dir / ckpt.LAST_FILE, self.eval_model, train_config=self.config,
                            training=self._summary({}))
        self.emit(Saved(str(self.run_dir / ckpt.STATE_FILE), "interrupted"))


def _resumed_config(stored: TrainConfig, given: TrainConfig) -> TrainConfig:
    """The run's own settings; only a budget given again (epochs, steps, time) replaces the stored one."""
    budget = {k: getattr(given, k) for k in ("epochs", "steps", "time_limit")}
    return dataclasses.replace(stored, **budget) if any(v is not None for v in budget.values()) else stored
