"""Mirror images: a denoiser trains on flipped images by default, and `denoise` averages each estimate with its
mirror image's (mirrored back) for a model trained so."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from vaetool.checkpoint import load_model
from vaetool.cli.app import app
from vaetool.inference.tiledenoise import ModelRunner, denoise_image

SIGMA = 0.1


def _noisy(count: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 3, 3, generator=generator)
    clean = 0.25 + 0.5 * F.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)
    return (clean + SIGMA * torch.randn(clean.shape, generator=generator)).clamp(0, 1)


def _save(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"n_{i}.png")


def _train(tmp_path, *extra: str):
    command = ["train", str(tmp_path / "noisy"), "-o", str(tmp_path / "run"), "--corrupt", "gaussian:0.1",
               "--image-size", "16", "--widths", "8", "--steps", "3", "--batch-size", "8", "--no-disk-cache",
               "--no-report", "--device", "cpu", "--no-fit-prior", "--force", *extra]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.stderr
    return load_model(tmp_path / "run" / "last.safetensors")


def test_the_mirror_estimate_is_the_mean_of_the_image_and_its_mirror_images_estimates(tmp_path):
    _save(_noisy(12, 16, seed=0), tmp_path / "noisy")
    model = _train(tmp_path).model.eval()
    x = _noisy(5, 16, seed=1)
    plain, mirrored = ModelRunner(model), ModelRunner(model, mirror=True)
    expected = (plain(x) + plain(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(mirrored(x), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(mirrored(x), plain(x), atol=1e-4)  # the model is not mirror-symmetric itself
    # A plausible version (a key naming a draw) stays one draw; the estimates of the same batch are averaged.
    sampler = ModelRunner(model, samples=2, mirror=True)
    keys = [(7, 0, None), (7, 0, 1)]
    out = sampler(x[:2], keys)
    torch.testing.assert_close(out[1], ModelRunner(model, samples=2)(x[:2], keys)[1], atol=1e-6, rtol=0)
    # Whole images and half the rows per pass, so the batch's memory stays what it was.
    assert mirrored.rows_per_batch(64, (3, 16, 16)) == 32 and plain.rows_per_batch(64, (3, 16, 16)) == 64
    torch.testing.assert_close(denoise_image(model, x[0], mirror=True), expected[0], atol=1e-6, rtol=0)


def test_a_denoiser_trains_on_mirror_images_and_denoise_averages_by_default(tmp_path):
    _save(_noisy(12, 16, seed=0), tmp_path / "noisy")
    assert _train(tmp_path).train_config.augment_flip  # --corrupt: mirror images by default
    _save(_noisy(2, 16, seed=3), tmp_path / "in")

    def denoise(*extra: str) -> tuple[list[np.ndarray], str]:
        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["denoise", str(tmp_path / "run" / "last.safetensors"), str(tmp_path / "in"),
                                          "-o", str(out), "--device", "cpu", "--no-wiener", "--json", "--force",
                                          *extra])
        assert result.exit_code == 0, result.stderr
        return [np.asarray(Image.open(path)) for path in sorted(out.glob("*.png"))], result.stderr + result.stdout

    (default, said), (mirrored, _), (plain, _) = denoise(), denoise("--mirror"), denoise("--no-mirror")
    assert "averaged with its mirror image's" in said
    assert all(np.array_equal(a, b) for a, b in zip(default, mirrored))
    assert any(not np.array_equal(a, b) for a, b in zip(default, plain))
    # Trained without mirror images, the default is the plain estimate.
    assert not _train(tmp_path, "--no-flip").train_config.augment_flip
    (default, said), (plain, _) = denoise(), denoise("--no-mirror")
    assert "mirror image" not in said
    assert all(np.array_equal(a, b) for a, b in zip(default, plain))
