"""Denoising from noisy images alone: the noise-model likelihood, the sigma estimate, MMSE and diverse outputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from vaetool.checkpoint import load_model, save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig, TrainConfig, parse_noise_model
from vaetool.errors import ConfigError
from vaetool.events import Note, Warning
from vaetool.inference.denoise import denoise_files
from vaetool.inference.mmse import estimate
from vaetool.inference.wiener import WienerStep
from vaetool.models.base import build_model
from vaetool.models.noise_level import estimate_image_sigma
from vaetool.training.noise import estimate_sigma, fit_noise_model

VAETOOL = str(Path(sys.executable).with_name("vaetool"))
SIGMA = 0.1
NOISY = ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=2, downsample=4,
                    noise_model="gaussian", noise_sigma=SIGMA)


def _clean(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth colour images (N, 3, S, S) kept inside [0.2, 0.8], so added noise is rarely clipped."""
    low = torch.rand(count, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    return 0.2 + 0.6 * F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _noisy(clean: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return (clean + sigma * noise).clamp(0, 1)


def _save_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"n_{i:03d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ the noise model


def test_the_noise_likelihood_is_a_normal_around_the_decoded_signal():
    model = build_model(NOISY).train()  # in training too: the scale is the noise's, never the batch optimum
    x, logits = torch.rand(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    expected = torch.distributions.Normal(torch.sigmoid(logits), SIGMA).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_likelihood(x, logits), expected)
    assert not any(p is model.log_scale for p in model.parameters())  # fixed, not learned


def test_sigma_is_estimated_within_ten_percent_on_synthetic_noise():
    clean = _clean(64, size=32)
    for sigma in (0.02, 0.06, 0.1, 0.2):
        found = estimate_sigma(_noisy(clean, sigma))
        assert abs(found - sigma) < 0.1 * sigma, (sigma, found)
    uint8 = (_noisy(clean, 0.1) * 255).round().to(torch.uint8)  # as the training cache holds it
    assert abs(estimate_sigma(uint8) - 0.1) < 0.01


def _texture(size: int = 64) -> torch.Tensor:
    """Fine colour texture (3, S, S): detail at the scale of the finest wavelet, which its median takes for noise."""
    y, x = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    stripes = 0.5 + 0.2 * torch.sin(2.1 * x + 0.7 * y) * torch.cos(1.3 * y)
    return torch.stack([stripes, 1.0 - stripes, 0.5 + 0.3 * torch.sin(0.9 * x)])


@pytest.mark.parametrize("channels", [3, 1])
def test_one_images_sigma_comes_from_its_patches_where_texture_fools_the_wavelet_median(channels):
    texture = _texture()[:channels]
    for sigma in (0.02, 0.06, 0.1):
        noisy = _noisy(texture[None], sigma)[0]
        assert abs(estimate_image_sigma(noisy) - sigma) < 0.03 * sigma, sigma
        assert estimate_sigma(noisy[None]) > 1.3 * sigma  # the wavelet median counts the texture as noise
        assert WienerStep(None, "estimated from each image").sigma_of(noisy) == estimate_image_sigma(noisy)


def test_an_image_too_small_for_its_patches_gets_the_wavelet_estimate():
    tiny = _noisy(_clean(1, size=9), 0.1)
    assert estimate_image_sigma(tiny[0]) == estimate_sigma(tiny)


def test_clean_images_are_warned_about_and_a_given_sigma_is_kept():
    events = []
    config = ModelConfig(image_size=16, widths=(8, 16), noise_model="gaussian")
    fitted = fit_noise_model(config, (_clean(32) * 255).to(torch.uint8), emit=events.append)
    assert [e for e in events if isinstance(e, Warning) and "look clean" in e.message]
    assert 0 < fitted.noise_sigma < 3 / 255
    events.clear()
    noisy = fit_noise_model(config, (_noisy(_clean(32), 0.1) * 255).to(torch.uint8), emit=events.append)
    assert abs(noisy.noise_sigma - 0.1) < 0.01 and not [e for e in events if isinstance(e, Warning)]
    assert fit_noise_model(NOISY, torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).noise_sigma == SIGMA
    assert any(isinstance(e, Note) and "estimated" in e.message for e in events)


def test_noise_model_option_values():
    assert parse_noise_model("gaussian") == ("gaussian", 0.0)
    assert parse_noise_model("gaussian:0.1") == ("gaussian", 0.1)
    assert parse_noise_model("Gaussian:25.5") == ("gaussian", pytest.approx(0.1))
    for bad in ("poisson", "gaussian:x", "gaussian:0"):
        with pytest.raises(ConfigError):
            parse_noise_model(bad)
    with pytest.raises(ConfigError, match="drop --likelihood"):
        ModelConfig(noise_model="gaussian", likelihood="laplace")


# ------------------------------------------------------------------------------ a tiny model trained on noise alone


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny spatial model trained for 150 steps on noisy smooth images only (sigma estimated)."""
    from vaetool.training.trainer import train

    root = tmp_path_factory.mktemp("noisy")
    clean = _clean(256)
    _save_pngs(_noisy(clean, SIGMA), root / "noisy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train([root / "noisy"], root / "run", model_config=NOISY.__class__.from_dict(
                           NOISY.to_dict() | {"noise_sigma": 0.0}),
                       train_config=TrainConfig(steps=150, batch_size=16, val_fraction=0.0, log_every=50,
                                                lr_schedule="constant"),
                       device="cpu", detect_channels=False, report=False, cache_dir=None)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "checkpoint": result.checkpoint, "clean": clean}


def test_a_noisy_only_model_keeps_its_noise_model_through_the_checkpoint(trained, tmp_path):
    loaded = load_model(trained["checkpoint"])
    assert loaded.config.noise_model == "gaussian" and abs(loaded.config.noise_sigma - SIGMA) < 0.015
    assert math.isclose(float(loaded.model.log_scale), math.log(loaded.config.noise_sigma), rel_tol=1e-5)
    again = load_model(save_model(tmp_path / "again.safetensors", loaded.model))
    assert again.config == loaded.config


def test_the_mmse_estimate_beats_single_samples_on_average(trained):
    model = load_model(trained["checkpoint"]).model.eval()
    clean = _clean(16, seed=5)  # held out: not the training images
    noisy = _noisy(clean, SIGMA, seed=6)
    keys = [(i, 0, None) for i in range(len(noisy))]
    with torch.inference_mode():
        mmse = estimate(model, noisy, keys, samples=16, seed=0)
        singles = [estimate(model, noisy, [(i, 0, d) for i in range(len(noisy))], samples=16, seed=0)
                   for d in range(4)]
    single_error = torch.stack([(s - clean).pow(2).mean() for s in singles]).mean()
    assert (singles[0] - singles[1]).abs().mean() > 1e-3  # the samples differ: the comparison means something
    assert (mmse - clean).pow(2).mean() < single_error


def test_diverse_writes_n_different_files_per_image_the_same_for_a_seed(trained, tmp_path):
    inputs = _save_pngs(_noisy(_clean(2, seed=7), SIGMA, seed=8), tmp_path / "in")
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        outcome = denoise_files(trained["checkpoint"], [tmp_path / "in"], tmp_path / name / "out", device="cpu",
                                samples=4, seed=seed, diverse=3, diverse_dir=tmp_path / name / "div")
        assert len(outcome.written) == 2 * 4 and not outcome.failed
        runs[name] = {p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*.png"))}
    assert sorted(runs["a"]) == sorted(["out/n_000.png", "out/n_001.png"]
                                       + [f"div/n_00{i}_{k}.png" for i in range(2) for k in (1, 2, 3)])
    assert runs["a"] == runs["b"]  # deterministic for a seed
    assert runs["a"] != runs["c"]
    versions = [runs["a"][f"div/n_000_{k}.png"] for k in (1, 2, 3)]
    assert len(set(versions)) == 3  # three different versions
    assert Image.open(tmp_path / "a" / "div" / "n_001_2.png").size == Image.open(inputs[1]).size


@pytest.mark.slow
def test_installed_command_end_to_end_on_a_tiny_noisy_folder(tmp_path):
    _save_pngs(_noisy(_clean(8), SIGMA), tmp_path / "noisy")
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    train = subprocess.run([VAETOOL, "train", str(tmp_path / "noisy"), "-o", str(tmp_path / "run"),
                            "--noise-model", "gaussian", "--model", "spatial", "--image-size", "16", "--widths",
                            "8,16", "--latent-channels", "2", "--steps", "4", "--batch-size", "4",
                            "--no-disk-cache", "--no-report", "--device", "cpu"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr
    assert "noise model gaussian, sigma" in train.stderr and "estimated from 8 images" in train.stderr
    result = subprocess.run([VAETOOL, "denoise", str(tmp_path / "run"), str(tmp_path / "noisy"), "-o",
                             str(tmp_path / "out"), "--samples", "2", "--diverse", "2", str(tmp_path / "div"),
                             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 8 * 3 and "MMSE over 2 posterior samples" in result.stderr
    assert len(list((tmp_path / "div").glob("*.png"))) == 16


def test_samples_and_diverse_usage_errors(tmp_path):
    result = CliRunner().invoke(app, ["denoise", "x.safetensors", "in", "-o", "out", "--diverse", "0", "d"])
    assert result.exit_code == 2 and "--diverse" in result.stderr
    result = CliRunner().invoke(app, ["denoise", "x.safetensors", "in", "-o", "out", "--samples", "-1"])
    assert result.exit_code == 2


def test_the_in_memory_mmse_estimate_does_not_depend_on_the_batch_size(trained):
    from vaetool.inference.tiledenoise import denoise_image

    model = load_model(trained["checkpoint"]).model.eval()
    image = _noisy(_clean(1, size=40, seed=9), SIGMA, seed=10)[0]  # (3, 40, 40): tiles of 16 px
    one = denoise_image(model, image, tile=16, batch_size=1, samples=3, seed=2)
    many = denoise_image(model, image, tile=16, batch_size=64, samples=3, seed=2)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    assert not torch.allclose(one, denoise_image(model, image, tile=16, samples=3, seed=3))
