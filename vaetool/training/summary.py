"""What a run tells its caller: the start info, the steady speed, the end-of-run result, and the report at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checkpoint as ckpt
from ..events import Callback, Saved, Warning

if TYPE_CHECKING:
    from .trainer import Trainer

SPEED_SKIP_STEPS = 5  # a process's first steps (allocation, kernel choice) do not count toward the steady speed


class SteadySpeed:
    """Images/s of the training steps alone: after the first steps, with validation and saving left out.

    `tick(step, now)` is called at points where the device has finished its work (a host sync);
    `pause()` at the end of each epoch, so the time until the next epoch's first tick is not counted.
    """

    def __init__(self, *, first_step: int) -> None:
        self.from_step = first_step + SPEED_SKIP_STEPS
        self.mark: tuple[float, int] | None = None
        self.seconds, self.steps = 0.0, 0
        self.report: tuple[float, int] | None = None  # the previous progress report, for the recent speed

    def tick(self, step: int, now: float) -> None:
        if self.report is None:
            self.report = (now, step)
        if self.mark is not None:
            self.seconds += now - self.mark[0]
            self.steps += step - self.mark[1]
        self.mark = (now, step) if step >= self.from_step else None

    def pause(self) -> None:
        self.mark = None
        self.report = None

    def images_per_s(self, global_batch: int) -> float | None:
        return self.steps * global_batch / self.seconds if self.seconds > 0 else None

    def recent(self, step: int, now: float, global_batch: int) -> float:
        """Images/s since the previous call (or since the epoch's first tick)."""
        then, first = self.report or (now, step)
        self.report = (now, step)
        return (step - first) * global_batch / max(now - then, 1e-9)


def start_info(trainer: Trainer) -> dict[str, Any]:
    """The Started event's info: data, batch geometry, device, precision, model and budget."""
    split, cache, cfg = trainer.split, trainer.cache, trainer.config
    return {"images": cache.image_count, "patches": cache.counts is not None,
            "train": len(split.train_index), "val": len(split.val_index),
            "skipped": len(cache.skipped), "batch": split.batch, "global_batch": split.global_batch,
            "world": trainer.world.size, "steps_per_epoch": split.steps_per_epoch,
            "total_steps": trainer.total_steps, "start_step": trainer.counters.step,
            "device": str(trainer.device), "precision": trainer.record["precision"],
            "config": trainer.model_config.to_dict(), "time_limit": cfg.time_limit, "prior": trainer.prior_kind, "prior_seconds": trainer.prior_seconds, "lr_schedule": cfg.lr_schedule, "log_every": cfg.log_every,
            "cache_on_disk": cache.on_disk, "cache_reused": cache.reused}


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind, and how it went."""

    checkpoint: Path
    run_dir: Path
    step: int
    epoch: int  # the last epoch reported, as in metrics.jsonl (a partial last epoch counts)
    stopped: str  # "budget" or "early-stop"
    metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable inputs: (path, reason)
    full_epochs: int = 0
    images_per_s: float | None = None  # steady: training steps only, after the first few
    wall_s: float = 0.0  # this invocation, decoding and saving included
    device: str = ""
    precision: str = ""
    best_epoch: int | None = None
    best_val_neg_elbo: float | None = None  # None without a validation set
    best_val_psnr: float | None = None
    report: Path | None = None
    prior: dict[str, Any] | None = None  # the fitted prior's summary (FittedPrior.describe), when one was fitted

    @classmethod
    def of(cls, trainer: Trainer, *, stopped: str, metrics: dict[str, Any], report: Path | None,
           wall_s: float, prior: dict[str, Any] | None = None) -> TrainResult:
        c, has_val = trainer.counters, len(trainer.split.val_index) > 0
        return cls(trainer.run_dir / ckpt.MODEL_FILE, trainer.run_dir, c.step, metrics.get("epoch", c.epoch),
                   stopped, metrics, [(str(a), b) for a, b in trainer.cache.skipped], full_epochs=c.epoch,
                   images_per_s=trainer.speed.images_per_s(trainer.split.global_batch), wall_s=wall_s,
                   device=trainer.record["device"], precision=trainer.record["precision"],
                   best_epoch=c.best_epoch or None, best_val_neg_elbo=(c.best if c.best_neg_elbo is None else c.best_neg_elbo) if has_val and c.best_epoch else None,
                   best_val_psnr=c.best_psnr, report=report, prior=prior)

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary `train --json` prints."""
        return {"checkpoint": str(self.checkpoint), "run_dir": str(self.run_dir), "step": self.step,
                "epoch": self.epoch, "full_epochs": self.full_epochs, "stopped": self.stopped,
                "images_per_s": _round(self.images_per_s), "wall_s": round(self.wall_s, 2), "device": self.device,
                "precision": self.precision, "best_epoch": self.best_epoch,
                "best_val_neg_elbo": _round(self.best_val_neg_elbo), "best_val_psnr": _round(self.best_val_psnr),
                "report": str(self.report) if self.report else None, "prior": self.prior,
                "metrics": self.metrics, "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}

    def describe(self) -> str:
        """One line for the end of a run: steps, epochs, speed, the best epoch's figures, why it stopped."""
        partial = " (the last one partial)" if self.metrics.get("partial") else ""
        parts = [f"{self.step} steps, {self.epoch} epoch(s){partial} in {self.wall_s:.0f}s"]
        if self.images_per_s:
            parts.append(f"{self.images_per_s:.0f} images/s on {self.device} ({self.precision})")
        if self.best_epoch is not None and self.best_val_neg_elbo is not None:
            psnr = f", PSNR {self.best_val_psnr:.2f} dB" if self.best_val_psnr is not None else ""
            parts.append(f"best epoch {self.best_epoch}: validation -ELBO {self.best_val_neg_elbo:.2f}{psnr}")
        if self.prior and self.prior.get("kind") == "second-stage":
            parts.append(f"second-stage prior: {self.prior['steps']} steps, {self.prior['components']} component(s)")
        elif self.prior:
            parts.append(f"fitted prior: {self.prior['components']} component(s)")
        parts.append(f"stopped by {self.stopped}")
        if self.report:
            parts.append(f"report {self.report}")
        return "; ".join(parts)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_report_safely(run_dir: Path, emit: Callback) -> Path | None:
    """report.png and report.html; a failure here costs the pictures, never the trained run."""
    from .report import write_report

    try:
        png, html = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - matplotlib or a full disk must not lose the run
        emit(Warning(f"could not write the training report: {exc}"))
        return None
    emit(Saved(str(png), "report"))
    emit(Saved(str(html), "report"))
    return html
