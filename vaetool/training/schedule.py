"""The learning rate and KL weight over a run: linear warm-up, then cosine decay to a floor as the budget runs out."""

from __future__ import annotations

import math

from ..config import TrainConfig

# The cosine ends at lr / 10, not 0: the last updates of a --time run still teach something, and a
# run resumed with a larger budget restarts from a rate that is small but not dead (nanoGPT's
# min_lr = lr / 10, after Chinchilla, Hoffmann et al. 2022).
FINAL_LR_FRACTION = 0.1


def budget_fraction(*, step: int, total_steps: int | None, elapsed: float, time_budget: float | None) -> float:
    """How much of the budget is spent, in [0, 1]: steps of the step budget or seconds of the time budget, whichever is nearer its end.

    `elapsed` and `time_budget` count the whole run's training time (earlier invocations included),
    so a resumed run continues the same curve.
    """
    parts = []
    if total_steps:
        parts.append(step / total_steps)
    if time_budget:
        parts.append(elapsed / time_budget)
    return min(1.0, max(parts)) if parts else 0.0


def learning_rate(config: TrainConfig, *, step: int, fraction: float) -> float:
    """The rate for optimiser step `step` (0-based) once `fraction` of the budget is spent."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "constant":
        return config.lr * warm
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))  # 1 -> 0 over the budget
    return config.lr * warm * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)


def kl_weight(config: TrainConfig, *, step: int) -> float:
    """beta, rising linearly from 0 over `kl_warmup_steps` when that is set."""
    warmup = config.kl_warmup_steps
    return config.beta * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
