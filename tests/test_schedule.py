"""The learning-rate schedule: warm-up, cosine decay to lr/10 over the budget (steps or time), exact on resume."""

from __future__ import annotations

import itertools
import types

import pytest

from vaetool.config import ModelConfig, TrainConfig
from vaetool.events import Progress
from vaetool.training.schedule import FINAL_LR_FRACTION, budget_fraction, learning_rate
from vaetool.training.trainer import train

TINY = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))
LR = 0.01


def test_warm_up_then_cosine_to_the_floor():
    config = TrainConfig(lr=LR, warmup_steps=10)
    assert learning_rate(config, step=0, fraction=0.0) == pytest.approx(LR / 10)  # the first warm-up step
    assert learning_rate(config, step=9, fraction=0.0) == pytest.approx(LR)  # warm-up done, decay not begun
    assert learning_rate(config, step=500, fraction=0.5) == pytest.approx(LR * (FINAL_LR_FRACTION + 0.45))
    assert learning_rate(config, step=999, fraction=1.0) == pytest.approx(LR * FINAL_LR_FRACTION)
    rates = [learning_rate(config, step=10 + k, fraction=k / 100) for k in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises after the warm-up
    constant = TrainConfig(lr=LR, warmup_steps=10, lr_schedule="constant")
    assert learning_rate(constant, step=500, fraction=0.9) == LR


def test_budget_fraction_by_steps_time_or_whichever_ends_first():
    assert budget_fraction(step=25, total_steps=100, elapsed=0.0, time_budget=None) == 0.25
    assert budget_fraction(step=0, total_steps=None, elapsed=30.0, time_budget=60.0) == 0.5
    assert budget_fraction(step=25, total_steps=100, elapsed=45.0, time_budget=60.0) == 0.75
    assert budget_fraction(step=10, total_steps=None, elapsed=99.0, time_budget=60.0) == 1.0
    assert budget_fraction(step=10, total_steps=None, elapsed=5.0, time_budget=None) == 0.0


def test_old_configs_keep_the_constant_rate_they_were_trained_with():
    stored = TrainConfig().to_dict()
    for key in ("lr_schedule", "warmup_steps"):
        del stored[key]
    old = TrainConfig.from_dict(stored)
    assert old.lr_schedule == "constant" and old.warmup_steps == 20
    assert TrainConfig.from_dict(TrainConfig().to_dict()).lr_schedule == "cosine"


def _rates(data, out, *, steps=8, resume=False, stop_at=None):
    """(step, lr) of every step of a tiny run with a 2-step warm-up; `stop_at` interrupts it there."""
    seen = []

    def record(event):
        if isinstance(event, Progress) and event.metrics:
            seen.append((event.done, event.metrics["lr"]))
            if event.done == stop_at:
                raise KeyboardInterrupt

    config = TrainConfig(steps=steps, batch_size=2, val_fraction=0.2, seed=3, log_every=1, lr=LR, warmup_steps=2)
    try:
        train([data], out, model_config=TINY, train_config=config, device="cpu", cache_dir=None, resume=resume,
              report=False, callback=record)
    except KeyboardInterrupt:
        pass
    return seen


def test_rates_at_start_middle_and_end_and_the_same_after_resuming(blob_folder, tmp_path):
    whole = dict(_rates(blob_folder, tmp_path / "whole"))
    config = TrainConfig(lr=LR, warmup_steps=2)
    assert whole[1] == pytest.approx(LR / 2)  # step 1 of a 2-step warm-up
    assert whole[5] == pytest.approx(learning_rate(config, step=4, fraction=0.5)) == pytest.approx(0.55 * LR)
    assert whole[8] == pytest.approx(learning_rate(config, step=7, fraction=7 / 8))
    assert whole[8] < 0.15 * LR  # near the floor at the end
    cut = _rates(blob_folder, tmp_path / "cut", stop_at=5)
    resumed = _rates(blob_folder, tmp_path / "cut", resume=True)
    assert [s for s, _ in cut] == [1, 2, 3, 4, 5] and [s for s, _ in resumed] == [6, 7, 8]
    assert dict(cut + resumed) == whole  # exactly the same rates, step for step


def test_a_time_budget_decays_by_the_elapsed_fraction(blob_folder, tmp_path, monkeypatch):
    from vaetool.training import trainer

    ticks = itertools.count()  # a clock that moves 0.05 s each time it is read: the same run on any machine
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(monotonic=lambda: 0.05 * next(ticks)))
    seen = []
    config = TrainConfig(time_limit=5.0, batch_size=2, val_fraction=0.2, log_every=1, lr=LR, warmup_steps=1)
    result = train([blob_folder], tmp_path / "run", model_config=TINY, train_config=config, device="cpu",
                   cache_dir=None, report=False,
                   callback=lambda e: seen.append(e.metrics) if isinstance(e, Progress) and e.metrics else None)
    assert len(seen) == result.step > 8
    assert seen[0]["lr"] == LR and seen[-1]["lr"] < 0.2 * LR  # from the top to near the floor, in time
    assert seen[-1]["budget"] > 0.9 and all(a["lr"] >= b["lr"] for a, b in zip(seen, seen[1:]))
    for m in seen:  # each step's rate is the cosine at the fraction of the time spent
        assert FINAL_LR_FRACTION * LR <= m["lr"] <= LR
