"""The training loop: outputs, determinism, exact resume, interruption and divergence."""

from __future__ import annotations

import json

import pytest
import torch

from vaetool.checkpoint import load_model
from vaetool.config import ModelConfig, TrainConfig
from vaetool.errors import DivergenceError, OutputError
from vaetool.training.trainer import train

TINY = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))


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
    result = run(blob_folder, tmp_path / "run", steps=9, callback=lambda e, d: events.append(e))
    run_dir = tmp_path / "run"
    for name in ("model.safetensors", "last.safetensors", "state.safetensors", "metrics.jsonl",
                 "samples.png", "reconstructions.png"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) >= 2 and lines[-1]["step"] == 9 == result.step
    for key in ("train_loss", "train_recon", "train_kl", "val_neg_elbo", "val_psnr"):
        assert all(key in line for line in lines)
    assert list((run_dir / "grids").glob("epoch_*_samples.png"))
    assert {"start", "step", "epoch", "saved"} <= set(events)
    assert load_model(run_dir).training["step"] <= 9
    # channels were detected as RGB; the loaded config is the trained one
    assert load_model(run_dir).config.channels == 3


def test_same_seed_same_weights(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "a")
    run(blob_folder, tmp_path / "b")
    assert_same(weights(tmp_path / "a" / "last.safetensors"), weights(tmp_path / "b" / "last.safetensors"))


def test_resume_matches_uninterrupted_run(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "full", steps=7)
    run(blob_folder, tmp_path / "split", steps=3)  # stops mid-epoch (4 steps per epoch)
    result = run(blob_folder, tmp_path / "split", steps=7, resume=True)
    assert result.step == 7
    assert_same(weights(tmp_path / "full" / "last.safetensors"), weights(tmp_path / "split" / "last.safetensors"))


def test_interrupt_saves_resumable_state(blob_folder, tmp_path):
    def stop_at_step_5(event, data):
        if event == "step" and data["step"] == 5:
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
