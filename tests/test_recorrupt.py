"""Denoising from noisy images alone by recorrupting them (--noise-model gaussian --recorrupt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from vaetool.checkpoint import load_model
from vaetool.cli.app import app
from vaetool.config import RECORRUPT_ALPHA, Corruption, TrainConfig
from vaetool.errors import ConfigError
from vaetool.events import Note, Warning
from vaetool.training.corrupt import corrupt, target_noise_variance, training_pair
from vaetool.training.noise import fit_recorruption

SIGMA = 0.1


def _clean(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth colour images (N, 3, S, S) inside [0.25, 0.75], so noise of std 0.1 is seldom clipped."""
    low = torch.rand(count, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    return 0.25 + 0.5 * F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _noisy(clean: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    return clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))


def _save_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images.clamp(0, 1)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"n_{i:03d}.png")


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A fixed denoiser: a 3x3 box filter per channel."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_the_recorrupted_target_scores_a_denoiser_as_the_clean_image_does_plus_a_constant():
    clean = _clean(64, size=32)
    noisy = _noisy(clean, SIGMA)
    recorrupt = [Corruption("recorrupt", SIGMA, SIGMA)]
    seen, target = training_pair(noisy, recorrupt, generator=torch.Generator().manual_seed(2), global_batch=64,
                                 rows=slice(None))
    # One draw z moves the input by +alpha sigma z and the target by -sigma z / alpha.
    z = (noisy - target) * RECORRUPT_ALPHA / SIGMA
    inside = (seen > 0) & (seen < 1)
    torch.testing.assert_close(seen[inside], (noisy + RECORRUPT_ALPHA * SIGMA * z)[inside])
    assert abs(float(z.std()) - 1) < 0.02
    # The error against the target is the error against the clean image plus the target's noise variance...
    against_target = (_blur(seen) - target).pow(2).mean()
    against_clean = (_blur(seen) - clean).pow(2).mean()
    extra = target_noise_variance(recorrupt)
    assert extra == pytest.approx(SIGMA ** 2 * (1 + 1 / RECORRUPT_ALPHA ** 2))
    assert float(against_target - against_clean) == pytest.approx(extra, rel=0.03)
    # ...which scoring against the noisy image itself is not: its noise is also in the input.
    naive = (_blur(seen) - noisy).pow(2).mean() - against_clean
    assert abs(float(naive) - SIGMA ** 2) > 0.2 * SIGMA ** 2


def test_clean_image_corruptions_keep_the_clean_target_and_recorrupt_takes_one_amount_alone():
    x = _clean(4)
    seen, target = training_pair(x, [Corruption("gaussian", 0.1, 0.1)], generator=torch.Generator().manual_seed(0),
                                 global_batch=4, rows=slice(None))
    assert target is x and not torch.equal(seen, x)
    assert target_noise_variance([Corruption("gaussian", 0.1, 0.1)]) == 0.0
    with pytest.raises(ConfigError, match="one noise std"):
        Corruption("recorrupt", 0.05, 0.1)
    with pytest.raises(ConfigError, match="no other corruption"):
        TrainConfig(corruptions=(Corruption("recorrupt", 0.1, 0.1), Corruption("mask", 0.1, 0.1)))
    with pytest.raises(ValueError, match="training_pair"):
        corrupt(x, [Corruption("recorrupt", 0.1, 0.1)], generator=torch.Generator(), global_batch=4,
                rows=slice(None))
    assert TrainConfig(corruptions=(Corruption("recorrupt", 0.1, 0.1),)).recorrupt == Corruption("recorrupt", 0.1, 0.1)
    assert TrainConfig.from_dict(TrainConfig(corruptions=(Corruption("recorrupt", 0.1, 0.1),)).to_dict()).recorrupt


def test_the_recorruption_sigma_is_estimated_from_the_images_and_a_given_one_kept():
    config = TrainConfig(corruptions=(Corruption("recorrupt", 0.0, 0.0),))
    events = []
    images = (_noisy(_clean(64, size=32), SIGMA).clamp(0, 1) * 255).round().to(torch.uint8)
    fitted = fit_recorruption(config, images, emit=events.append)
    assert abs(fitted.recorrupt.low - SIGMA) < 0.1 * SIGMA
    assert any(isinstance(e, Note) and "estimated from 64 images" in e.message for e in events)
    events.clear()
    fit_recorruption(config, (_clean(64, size=32) * 255).round().to(torch.uint8), emit=events.append)
    assert [e for e in events if isinstance(e, Warning) and "look clean" in e.message]
    given = TrainConfig(corruptions=(Corruption("recorrupt", 0.07, 0.07),))
    assert fit_recorruption(given, images) == given
    assert fit_recorruption(TrainConfig(), images) == TrainConfig()


def test_recorrupt_usage_errors(tmp_path):
    def error(*args: str) -> str:
        result = CliRunner().invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "run"), *args])
        assert result.exit_code == 2
        return " ".join(result.stderr.replace("\u2502", " ").split())  # the message, unwrapped from its box

    assert "--recorrupt needs --noise-model gaussian" in error("--recorrupt")
    assert "give one of them" in error("--recorrupt", "--noise-model", "gaussian", "--corrupt", "gaussian:0.1")
    assert "needs --likelihood gaussian" in error("--recorrupt", "--noise-model", "gaussian", "--likelihood", "laplace")
    assert "--noise-model gaussian[:SIGMA] --recorrupt" in error("--corrupt", "recorrupt:0.1")
    assert not (tmp_path / "run").exists()


def test_a_recorrupted_model_learns_to_denoise_from_noisy_images_and_denoise_takes_its_wiener_step(tmp_path):
    _save_pngs(_noisy(_clean(256), SIGMA), tmp_path / "noisy")
    command = ["train", str(tmp_path / "noisy"), "-o", str(tmp_path / "run"), "--noise-model", "gaussian",
               "--recorrupt", "--image-size", "16", "--widths", "8", "--steps", "150", "--batch-size", "16",
               "--no-disk-cache", "--no-report", "--device", "cpu", "--no-fit-prior", "--lr-schedule", "constant"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, command)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr
    assert "recorrupted training at noise sigma" in result.stderr and "estimated from 256 images" in result.stderr
    loaded = load_model(tmp_path / "run" / "last.safetensors")
    [recorrupt] = loaded.train_config.corruptions
    assert recorrupt.kind == "recorrupt" and abs(recorrupt.low - SIGMA) < 0.015
    assert loaded.config.noise_model == "none" and loaded.train_config.beta == pytest.approx(0.01)
    # Never shown a clean image, it denoises held-out ones.
    clean = _clean(32, seed=5)
    noisy = _noisy(clean, SIGMA, seed=6).clamp(0, 1)
    with torch.inference_mode():
        denoised = loaded.model.eval().reconstruct(noisy)
    before, after = (noisy - clean).pow(2).mean(), (denoised - clean).pow(2).mean()
    assert 10 * torch.log10(before / after) > 2.0  # 3.2 dB when written
    # The run's validation PSNR estimates the clean one: below the noisy images' 20 dB it would be useless.
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_psnr"] > 22.0  # 23.8 when written; the inputs 20 dB
    # `denoise` gives it the Wiener step with the sigma estimated per image, as a --corrupt model.
    _save_pngs(noisy[:2], tmp_path / "in")
    result = CliRunner().invoke(app, ["denoise", str(tmp_path / "run"), str(tmp_path / "in"), "-o",
                                      str(tmp_path / "out"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert "estimated from each image" in result.stderr or "estimated from each image" in result.stdout
    # The same command again with --resume is accepted (the run's own config), and goes on.
    again = CliRunner().invoke(app, [*(("160" if part == "150" else part) for part in command), "--resume"])
    assert again.exit_code == 0, again.stderr
