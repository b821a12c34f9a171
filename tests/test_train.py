"""The training loop: outputs, determinism, exact resume, interruption and divergence."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vaetool.checkpoint import load_model
from vaetool.config import ModelConfig, TrainConfig
from vaetool.errors import DivergenceError, OutputError
from vaetool.events import Epoch, Progress, Saved, Started
from vaetool.runtime import precision_name, resolve_precision
from vaetool.training.trainer import train

TINY = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))
AUTO_PRECISION = precision_name(resolve_precision("auto", torch.device("cpu"), training=True))  # bf16 on some CPUs


def run(data, out, *, steps=4, callback=None, resume=False, force=False, **train_kw):
    config = TrainConfig(steps=steps, batch_size=2, val_fraction=0.2, seed=3, log_every=1, **train_kw)
    return train([data], out, model_config=TINY, train_config=config, device="cpu", cache_dir=None,
                 resume=resume, force=force, callback=callback)


def weights(path):
    return load_model(path).model.state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_folder_contents_and_metrics(blob_folder, tmp_path):
    events = []
    result = run(blob_folder, tmp_path / "run", steps=9, callback=events.append)
    run_dir = tmp_path / "run"
    for name in ("model.safetensors", "last.safetensors", "state.safetensors", "metrics.jsonl",
                 "samples.png", "reconstructions.png"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) >= 2 and lines[-1]["step"] == 9 == result.step
    for key in ("train_loss", "train_recon", "train_kl", "val_neg_elbo", "val_psnr"):
        assert all(key in line for line in lines)
    assert list((run_dir / "grids").glob("epoch_*_samples.png"))
    assert {Started, Progress, Epoch, Saved} <= {type(e) for e in events}
    assert [e.command for e in events if isinstance(e, Started)] == ["decode", "train"]
    assert load_model(run_dir).training["step"] <= 9
    # channels were detected as RGB; the loaded config is the trained one
    assert load_model(run_dir).config.channels == 3


def test_same_seed_same_weights(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "a")
    run(blob_folder, tmp_path / "b")
    assert_same(weights(tmp_path / "a" / "last.safetensors"), weights(tmp_path / "b" / "last.safetensors"))


def test_resume_matches_uninterrupted_run(blob_folder, tmp_path):
    # A constant rate: with the cosine, a 3-step budget is a different schedule (interrupted runs: next test).
    run(blob_folder, tmp_path / "full", steps=7, lr_schedule="constant")
    run(blob_folder, tmp_path / "split", steps=3, lr_schedule="constant")  # stops mid-epoch (4 steps per epoch)
    result = run(blob_folder, tmp_path / "split", steps=7, resume=True)
    assert result.step == 7
    assert_same(weights(tmp_path / "full" / "last.safetensors"), weights(tmp_path / "split" / "last.safetensors"))


def test_interrupt_saves_resumable_state(blob_folder, tmp_path):
    def stop_at_step_5(event):
        if isinstance(event, Progress) and event.metrics and event.done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(blob_folder, tmp_path / "cut", steps=8, callback=stop_at_step_5)
    run(blob_folder, tmp_path / "cut", steps=8, resume=True)
    run(blob_folder, tmp_path / "whole", steps=8)
    assert_same(weights(tmp_path / "whole" / "last.safetensors"), weights(tmp_path / "cut" / "last.safetensors"))


def test_existing_run_needs_resume_or_force(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "r", steps=1)
    with pytest.raises(OutputError, match="--resume"):
        run(blob_folder, tmp_path / "r", steps=1)
    run(blob_folder, tmp_path / "r", steps=1, force=True)


def test_divergence_stops_with_a_fix_and_keeps_last_good(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "d", steps=4)
    good = weights(tmp_path / "d" / "model.safetensors")
    with pytest.raises(DivergenceError, match="--lr"):
        run(blob_folder, tmp_path / "d", steps=200, lr=1e12, grad_clip=1e30, force=True)
    # the failed run never saved NaN weights over the earlier checkpoint
    after = weights(tmp_path / "d" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert after.keys() == good.keys()


def test_corruption_and_ema_and_beta_zero_run(blob_folder, tmp_path):
    from vaetool.config import Corruption

    result = run(blob_folder, tmp_path / "c", steps=3, corruptions=(Corruption.parse("gaussian:0.05-0.2"),
                                                                   Corruption.parse("mask:0.2")), ema=0.9, beta=0.0)
    loaded = load_model(result.checkpoint)
    assert [str(c) for c in loaded.train_config.corruptions] == ["gaussian:0.05-0.2", "mask:0.2"]
    assert loaded.train_config.ema == 0.9


def test_force_keeps_the_old_metrics_until_the_new_run_has_an_epoch(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "r", steps=5)  # one epoch: 10 training images, 5 steps of 2
    old = (tmp_path / "r" / "metrics.jsonl").read_text()
    seen = []

    def look(event):
        if isinstance(event, Progress) and event.metrics:  # the new run is training, no epoch written yet
            seen.append((tmp_path / "r" / "metrics.jsonl").read_text())

    run(blob_folder, tmp_path / "r", steps=7, force=True, callback=look, lr=0.02)
    assert seen[:5] == [old] * 5  # the old run's metrics, untouched, through the new first epoch
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 7]  # then replaced at once by the new run's own
    assert rows[0] != json.loads(old)


def test_weights_that_blow_up_at_the_last_step_are_never_saved(blob_folder, tmp_path, monkeypatch):
    """The loss is computed before the update, so it is finite at the step whose update breaks the weights."""
    from vaetool.training import trainer

    run(blob_folder, tmp_path / "r", steps=5)  # one whole epoch
    before = {name: (tmp_path / "r" / name).read_bytes() for name in ("model.safetensors", "last.safetensors",
                                                                      "state.safetensors")}
    real = trainer.make_optimizer

    def poisoned(model, **kwargs):
        optimizer = real(model, **kwargs)
        step = optimizer.step

        def step_then_break(*args, **kw):
            step(*args, **kw)
            if optimizer.state[next(iter(optimizer.state))]["step"] == 10:  # the last update of epoch 2
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))

        optimizer.step = step_then_break
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", poisoned)
    with pytest.raises(DivergenceError, match="weights became NaN or infinite"):
        run(blob_folder, tmp_path / "r", steps=10, resume=True)
    for name, data in before.items():  # the last good epoch's files, byte for byte
        assert (tmp_path / "r" / name).read_bytes() == data, name


def test_the_result_says_speed_time_device_and_the_best_epoch(blob_folder, tmp_path):
    result = run(blob_folder, tmp_path / "r", steps=12)  # 5 steps per epoch: epochs 1, 2 and part of 3
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert result.epoch == rows[-1]["epoch"] == 3 and result.full_epochs == 2 and rows[-1]["partial"]
    assert result.images_per_s > 0 and result.wall_s > 0 and result.precision == AUTO_PRECISION
    assert result.device.startswith("cpu")
    best = min(rows, key=lambda r: r["val_neg_elbo"])
    assert result.best_epoch == best["epoch"] and result.best_val_neg_elbo == pytest.approx(best["val_neg_elbo"])
    assert result.best_val_psnr == pytest.approx(best["val_psnr"])
    summary = result.to_dict()
    assert json.loads(json.dumps(summary))["epoch"] == summary["metrics"]["epoch"]
    assert f"best epoch {best['epoch']}" in result.describe() and "images/s" in result.describe()


def test_the_run_folder_records_where_the_run_came_from(blob_folder, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, val_fraction=0.2, log_every=1)
    train([blob_folder], tmp_path / "r", model_config=TINY, train_config=config, device="cpu", cache_dir=None,
          invocation={"command": "vaetool train data -o r", "options": {"steps": 2}})
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["command"] == "vaetool train data -o r" and record["options"] == {"steps": 2}
    assert record["data"] == [str(blob_folder)] and record["precision"] == AUTO_PRECISION
    assert record["device"].startswith("cpu") and not record["resumed"]
    assert load_model(tmp_path / "r").training["run"]["command"] == "vaetool train data -o r"
    html = (tmp_path / "r" / "report.html").read_text()
    assert "vaetool train data -o r" in html and str(blob_folder) in html
    train([blob_folder], tmp_path / "r", model_config=TINY, train_config=dataclasses.replace(config, steps=3),
          device="cpu", cache_dir=None, resume=True, invocation={"command": "again"})
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["command"] == "again" and record["resumed"] and record["previous"][0]["command"].endswith("-o r")
