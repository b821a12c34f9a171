"""The training loop: one process or DDP under torchrun, resumable, reporting through a callback."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..io.cache import build_cache
from ..io.decode import detect_channels as detect_image_channels, to_float
from ..io.find import find_images
from ..io.atomic import check_writable_dir
from ..config import ModelConfig, TrainConfig
from .corrupt import corrupt, global_rand, global_randn, step_generator
from .distributed import World, all_reduce_sum, barrier, broadcast_flag, global_mean, init_world, shutdown
from .epoch import EpochEnd
from ..errors import DivergenceError, OutputError
from ..models.base import VAEFamily, build_model, elbo_loss
from ..runtime import BatchGatherer, autocast, precision_name, prepare, resolve_device, resolve_precision

DEFAULT_EPOCHS = 30
LR_WARMUP_STEPS = 20
Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    checkpoint: Path
    run_dir: Path
    step: int
    epoch: int
    stopped: str  # "budget", "early-stop" or "interrupted"
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Progress:
    """Counters saved in the resume state."""

    step: int = 0
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    elapsed: float = 0.0  # seconds of training before this process started


def default_cache_memory() -> int:
    """Half the memory available now: above this the decoded cache is memory-mapped from disk."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30


def _noop(event: str, data: dict[str, Any]) -> None:
    return None


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW: fused into one kernel on CUDA, the multi-tensor (foreach) version elsewhere.

    On a CPU the fused version was measured about 10 ms faster per step of the default model (1-2%),
    but it did not resume bit-exactly from a saved state here, and exact resume is worth more.
    """
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **kind)


def train(data: Sequence[str | Path], run_dir: str | Path, *, model_config: ModelConfig | None = None,
          train_config: TrainConfig | None = None, device: str = "auto", precision: str = "auto",
          detect_channels: bool = True, resume: bool = False, force: bool = False, strict: bool = False,
          cache_dir: str | Path | None = None, cache_memory: int | None = None, compile: bool = False,
          workers: int | None = None, report: bool = True, callback: Callback | None = None) -> TrainResult:
    """Train a VAEFamily on the images under `data`; write checkpoints, metrics and grids to `run_dir`.

    Under torchrun each process trains on its shard of every batch with DDP and only rank 0
    writes; at the end it draws `report.png` and `report.html` unless `report` is False.
    `callback(event, data)` receives progress: "cache", "skip", "start", "step", "epoch",
    "saved" and "warning" events.
    """
    trainer = _Trainer(Path(run_dir), callback or _noop, device=device, precision=precision)
    try:
        trainer.prepare_run(resume=resume, force=force)
        trainer.load_data(data, model_config or ModelConfig(), detect_channels=detect_channels and not resume,
                          resume=resume, strict=strict, cache_dir=cache_dir, cache_memory=cache_memory, workers=workers)
        trainer.build(train_config or TrainConfig(), resume=resume, compile=compile)
        return trainer.run(write_report_at_end=report)
    finally:
        shutdown(trainer.world)


class _Trainer(EpochEnd):
    def __init__(self, run_dir: Path, callback: Callback, *, device: str, precision: str) -> None:
        self.run_dir = run_dir
        self.device = resolve_device(device)
        self.world: World = init_world(self.device.type)
        self.callback = callback if self.world.is_main else _noop
        self.amp_dtype = resolve_precision(precision, self.device, training=True)
        self.gather = BatchGatherer(self.device)  # pinned, asynchronous host-to-GPU copies on CUDA
        prepare(self.device)

    # ----- set-up -------------------------------------------------------------------------
    def prepare_run(self, *, resume: bool, force: bool) -> None:
        existing = (self.run_dir / ckpt.MODEL_FILE).exists() or (self.run_dir / ckpt.STATE_FILE).exists()
        if resume and not (self.run_dir / ckpt.STATE_FILE).exists():
            raise OutputError(f"{self.run_dir} has no {ckpt.STATE_FILE} to resume from; start without --resume")
        if existing and not (resume or force):
            raise OutputError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                              f"or --force to start over")
        if self.world.is_main:
            # A read-only or full disk must show now, not after the first epoch of training.
            check_writable_dir(self.run_dir / "grids")
            if existing and force and not resume:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)

    def load_data(self, data: Sequence[str | Path], model_config: ModelConfig, *, detect_channels: bool,
                  resume: bool, strict: bool, cache_dir: str | Path | None, cache_memory: int | None,
                  workers: int | None) -> None:
        if resume:  # the run's own architecture, whatever the options say
            model_config = ModelConfig.from_dict(ckpt.load_state(self.run_dir / ckpt.STATE_FILE)[1]["model_config"])
        warn = lambda message: self.callback("warning", {"message": message})  # noqa: E731
        found = find_images(data, callback=lambda e: warn(getattr(e, "message", None) or f"{e.input}: {e.reason}"))
        if detect_channels:
            model_config = dataclasses.replace(model_config, channels=detect_image_channels([f.path for f in found]))
        self.model_config = model_config
        if self.world.distributed and cache_dir is None:
            cache_dir = Path(os.environ.get("VAETOOL_CACHE_DIR", Path.home() / ".cache" / "vaetool"))
        # Rank 0 decodes; the others then map the same on-disk cache instead of decoding again.
        for turn in (0, 1):
            if (turn == 0) == self.world.is_main:
                self.cache = build_cache(
                    found, image_size=model_config.image_size, channels=model_config.channels,
                    cache_dir=Path(cache_dir) if cache_dir else None, strict=strict, workers=workers,
                    memory_limit=cache_memory if cache_memory is not None else default_cache_memory(),
                    progress=lambda done, total: self.callback("cache", {"done": done, "total": total}))
            barrier(self.world)
        for path, reason in self.cache.skipped:
            self.callback("skip", {"path": str(path), "reason": reason})

    def build(self, config: TrainConfig, *, resume: bool, compile: bool) -> None:
        self.progress = _Progress()
        state_tensors: dict[str, torch.Tensor] = {}
        if resume:
            state_tensors, info = ckpt.load_state(self.run_dir / ckpt.STATE_FILE)
            stored = TrainConfig.from_dict(info["train_config"])
            budget = {k: getattr(config, k) for k in ("epochs", "steps", "time_limit")}
            config = dataclasses.replace(stored, **budget) if any(v is not None for v in budget.values()) else stored
            self.model_config = ModelConfig.from_dict(info["model_config"])
            self.progress = _Progress(**info["progress"])
        self.config = config
        self._split()
        torch.manual_seed(config.seed)  # the same seed gives the same initial weights
        self.model = build_model(self.model_config)
        self.model.reduce_mean = global_mean  # the decoder scale and free bits see the global batch
        if resume:
            self.model.load_state_dict({k[6:]: v for k, v in state_tensors.items() if k.startswith("model.")})
        self.model.to(self.device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval() if config.ema > 0 else None
        if self.ema is not None and resume:
            self.ema.load_state_dict({k[4:]: v for k, v in state_tensors.items() if k.startswith("ema.")})
        self.optimizer = make_optimizer(self.model, lr=config.lr, weight_decay=config.weight_decay, device=self.device)
        if resume:
            ckpt.restore_optimizer(self.optimizer, state_tensors, info["optimizer_groups"])
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.net: nn.Module = self.model
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if compile:
            self.net = torch.compile(self.net)

    def _split(self) -> None:
        count = len(self.cache.paths)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed))
        n_val = int(count * self.config.val_fraction)
        if n_val == 0 and self.config.val_fraction > 0 and count >= 4:
            n_val = 1
        self.val_index, self.train_index = order[:n_val], order[n_val:]
        n_train, world = len(self.train_index), self.world.size
        self.batch = min(self.config.batch_size, max(1, n_train // world))
        if self.batch < self.config.batch_size:
            self.callback("warning", {"message": f"only {n_train} training images: batch size lowered from "
                                                 f"{self.config.batch_size} to {self.batch} per process"})
        self.global_batch = self.batch * world
        self.steps_per_epoch = max(1, n_train // self.global_batch)

    # ----- the loop -----------------------------------------------------------------------
    def _budget_steps(self) -> int | None:
        cfg = self.config
        limits = [cfg.steps] if cfg.steps else []
        if cfg.epochs or not (cfg.steps or cfg.time_limit):
            limits.append((cfg.epochs or DEFAULT_EPOCHS) * self.steps_per_epoch)
        return min(limits) if limits else None

    def run(self, *, write_report_at_end: bool = True) -> TrainResult:
        p, total = self.progress, self._budget_steps()
        self.callback("start", {
            "images": len(self.cache.paths), "train": len(self.train_index), "val": len(self.val_index),
            "skipped": len(self.cache.skipped), "batch": self.batch, "global_batch": self.global_batch,
            "world": self.world.size, "steps_per_epoch": self.steps_per_epoch, "total_steps": total,
            "start_step": p.step, "device": str(self.device), "precision": precision_name(self.amp_dtype),
            "config": self.model_config.to_dict(), "time_limit": self.config.time_limit,
            "cache_on_disk": self.cache.on_disk, "cache_reused": self.cache.reused})
        self._clock = time.monotonic() - p.elapsed
        self._session_start = time.monotonic()  # --time limits this invocation, also when resuming
        stopped = "budget"
        try:
            with self._interrupts_between_steps():
                while True:
                    finished_epoch = self._run_epoch(total)
                    metrics = self._end_epoch(partial=not finished_epoch)
                    if self._out_of_budget(total):
                        break
                    if self.config.patience and p.bad_epochs >= self.config.patience:
                        stopped = "early-stop"
                        break
        except KeyboardInterrupt:
            self._save_state()
            self.callback("saved", {"path": str(self.run_dir / ckpt.STATE_FILE), "reason": "interrupted"})
            raise
        if self.world.is_main and write_report_at_end:
            self._write_report()
        barrier(self.world)
        return TrainResult(self.run_dir / ckpt.MODEL_FILE, self.run_dir, p.step, p.epoch, stopped, metrics,
                           [(str(a), b) for a, b in self.cache.skipped])

    @contextlib.contextmanager
    def _interrupts_between_steps(self):
        """Hold a Ctrl-C that arrives inside a training step until the step is counted.

        A KeyboardInterrupt between `optimizer.step()` and `step += 1` would save weights one update
        ahead of the counter, and the resumed run would apply that update twice.
        """
        self._in_step, self._held = False, False
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield  # a thread, or a caller with its own handler: leave signals alone
            return

        def on_sigint(signum: int, frame: object) -> None:
            if self._in_step:
                self._held = True
            else:
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def _step_section(self):
        """One step, indivisible by Ctrl-C: a held interrupt is raised once the counters are updated."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
        if self._held:
            self._held = False
            raise KeyboardInterrupt

    def _out_of_budget(self, total: int | None) -> bool:
        p, limit = self.progress, self.config.time_limit
        out = (total is not None and p.step >= total) or (limit is not None and time.monotonic() - self._session_start >= limit)
        return broadcast_flag(out, self.world, self.device)

    def _elapsed(self) -> float:
        return time.monotonic() - self._clock

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        # The order depends only on (seed, epoch): a resumed run sees the very same batches.
        generator = torch.Generator().manual_seed(self.config.seed * 7_368_787 + epoch + 1)
        order = self.train_index[torch.randperm(len(self.train_index), generator=generator)]
        return order[: self.steps_per_epoch * self.global_batch]

    def _run_epoch(self, total: int | None) -> bool:
        """Train until the epoch ends (True) or the budget runs out mid-epoch (False)."""
        p, cfg = self.progress, self.config
        order = self._epoch_order(p.epoch)
        self.model.train()
        self._sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, recon, kl, images
        self._epoch_sums = torch.zeros_like(self._sums)
        self._tick = (time.monotonic(), p.step)
        check_every = cfg.log_every if (self.world.distributed or self.device.type != "cpu") else 1
        while p.step_in_epoch < self.steps_per_epoch:
            start = p.step_in_epoch * self.global_batch + self.world.rank * self.batch
            with self._step_section():
                self._train_step(order[start: start + self.batch])
                p.step += 1
                p.step_in_epoch += 1
            if p.step % cfg.log_every == 0 or p.step_in_epoch == self.steps_per_epoch:
                self._report_steps(total)
            elif p.step % check_every == 0:
                self._check_finite()
            if p.step_in_epoch < self.steps_per_epoch and p.step % check_every == 0 and self._out_of_budget(total):
                return False
        p.epoch += 1
        p.step_in_epoch = 0
        return True

    def _beta(self) -> float:
        warmup = self.config.kl_warmup_steps
        return self.config.beta * (min(1.0, (self.progress.step + 1) / warmup) if warmup else 1.0)

    def _train_step(self, index: torch.Tensor) -> None:
        cfg, p = self.config, self.progress
        rows = slice(self.world.rank * self.batch, (self.world.rank + 1) * self.batch)
        generator = step_generator(cfg.seed, p.step, self.device)
        x = to_float(self.gather(self.cache.images, index)).contiguous(memory_format=torch.channels_last)
        if cfg.augment_flip:
            flip = global_rand((self.global_batch,), generator=generator, rows=rows, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noisy = corrupt(x, cfg.corruptions, generator=generator, global_batch=self.global_batch, rows=rows)
        noise = {name: global_randn((self.global_batch, *shape), generator=generator, rows=rows, device=self.device)
                 for name, shape in self.model.latent_shapes(*x.shape[-2:]).items()}  # level -> (B, ...)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (p.step + 1) / LR_WARMUP_STEPS)
        with autocast(self.device, self.amp_dtype):
            out = self.net(noisy, sample=cfg.beta > 0, noise=noise)
        terms = elbo_loss(self.model, x, out, beta=self._beta(), free_bits=cfg.free_bits)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(terms.loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self._update_ema()
        batch = torch.stack([terms.loss.detach().double() * len(index), terms.recon.sum().double(),
                             terms.kl.sum().double(), torch.tensor(float(len(index)), device=self.device,
                                                                  dtype=torch.float64)])
        self._sums += batch

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema
        ema_params, params = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def _check_finite(self) -> None:
        if not bool(torch.isfinite(self._sums[0])):
            self._diverged()

    def _diverged(self) -> None:
        good = self.run_dir / ckpt.MODEL_FILE
        kept = f"the last good checkpoint is {good}" if good.exists() else "no checkpoint was saved yet"
        raise DivergenceError(
            f"the loss became NaN or infinite at step {self.progress.step} ({kept}); lower the learning rate "
            f"(--lr, now {self.config.lr:g}) or the gradient clip (--grad-clip, now {self.config.grad_clip:g})")

    def _report_steps(self, total: int | None) -> None:
        sums = all_reduce_sum(self._sums.clone(), self.world).tolist()
        if not all(math.isfinite(v) for v in sums):
            self._diverged()
        self._epoch_sums += self._sums
        self._sums.zero_()
        now, (then, first_step) = time.monotonic(), self._tick
        steps = self.progress.step - first_step
        self._tick = (now, self.progress.step)
        count = max(sums[3], 1.0)
        self.callback("step", {
            "step": self.progress.step, "total_steps": total, "epoch": self.progress.epoch + 1,
            "loss": sums[0] / count, "recon": sums[1] / count, "kl": sums[2] / count,
            "images_per_s": steps * self.global_batch / max(now - then, 1e-9), "elapsed": self._elapsed(),
            "time_limit": self.config.time_limit, "beta": self._beta()})
