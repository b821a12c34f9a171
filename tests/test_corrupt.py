"""Corruptions: amounts, ranges and independence from how a batch is sharded."""

import torch

from vaetool.config import Corruption
from vaetool.training.corrupt import corrupt, step_generator


def _apply(x, spec, rows, global_batch):
    gen = step_generator(7, 3, torch.device("cpu"))
    return corrupt(x[rows], [Corruption.parse(s) for s in spec], generator=gen, global_batch=global_batch, rows=rows)


def test_noise_is_the_same_however_the_batch_is_split():
    x = torch.rand(4, 3, 8, 8)
    spec = ["gaussian:0.05-0.2", "mask:0.3", "saltpepper:0.1"]
    whole = _apply(x, spec, slice(0, 4), 4)
    halves = torch.cat([_apply(x, spec, slice(0, 2), 4), _apply(x, spec, slice(2, 4), 4)])
    torch.testing.assert_close(whole, halves)


def test_amounts():
    x = torch.full((64, 3, 16, 16), 0.5)
    masked = _apply(x, ["mask:0.25"], slice(0, 64), 64)
    dropped = (masked == 0).all(1).float().mean()
    assert abs(dropped - 0.25) < 0.02
    noisy = _apply(x, ["gaussian:0.1"], slice(0, 64), 64)
    assert abs((noisy - x).std() - 0.1) < 0.01
    sp = _apply(x, ["saltpepper:0.2"], slice(0, 64), 64)
    flipped = ((sp == 0) | (sp == 1)).all(1).float().mean()
    assert abs(flipped - 0.2) < 0.02
    assert sp.min() >= 0 and sp.max() <= 1


def _trained_config(tmp_path, name, *options):
    from typer.testing import CliRunner

    from conftest import make_blobs
    from vaetool.checkpoint import load_model
    from vaetool.cli.app import app

    data = tmp_path / "data"
    if not data.exists():
        make_blobs(data, count=8)
    result = CliRunner().invoke(app, ["train", str(data), "-o", str(tmp_path / name), "--steps", "1", "--image-size",
                                      "16", "--batch-size", "4", "--no-fit-prior", "--no-report", "--no-disk-cache",
                                      "--device", "cpu", *options])
    assert result.exit_code == 0, result.output
    return load_model(tmp_path / name).config, result.stderr


def test_a_denoiser_gets_the_denoising_model_and_kl_weight_unless_the_user_chose_them_and_its_estimate(tmp_path):
    from vaetool.checkpoint import load_model

    config, stderr = _trained_config(tmp_path, "a", "--corrupt", "gaussian:0.1")
    assert (config.kind, config.downsample, config.latent_channels) == ("spatial", 2, 16)
    assert "denoiser defaults: --model spatial --downsample 2 --latent-channels 16 --beta 0.01" in stderr
    assert load_model(tmp_path / "a").train_config.beta == 0.01  # supervised: the small KL weight
    config, _ = _trained_config(tmp_path, "b", "--noise-model", "gaussian:0.1", "--latent-channels", "4")
    assert (config.kind, config.downsample, config.latent_channels) == ("spatial", 2, 4)
    assert load_model(tmp_path / "b").train_config.beta == 1.0  # from noisy images alone: the full ELBO
    _, stderr = _trained_config(tmp_path, "e", "--corrupt", "gaussian:0.1", "--beta", "1")
    assert load_model(tmp_path / "e").train_config.beta == 1.0 and "--beta" not in stderr  # the user's own kept
    config, stderr = _trained_config(tmp_path, "c", "--corrupt", "mask:0.2", "--model", "vector", "--widths", "8,16",
                                     "--latent-dim", "4")
    assert config.kind == "vector" and "denoiser defaults: --beta 0.01 " in stderr  # the family is the user's
    config, _ = _trained_config(tmp_path, "d", "--model", "spatial", "--widths", "8,16", "--latent-channels", "2")
    assert (config.kind, config.downsample) == ("spatial", 4)  # no --corrupt: the plain defaults
    # One width means one halving: --widths alone fixes a spatial map's downsampling, denoiser or not.
    config, _ = _trained_config(tmp_path, "f", "--model", "spatial", "--widths", "8", "--latent-channels", "2")
    assert (config.kind, config.downsample, config.widths) == ("spatial", 2, (8,))
    config, _ = _trained_config(tmp_path, "g", "--corrupt", "gaussian:0.1", "--widths", "8")
    assert (config.kind, config.downsample, config.latent_channels) == ("spatial", 2, 16)
    from vaetool.events import Started
    from vaetool.inference.denoise import denoise_files

    # Without the Wiener step: the MMSE estimate for a noisy-only model and a supervised one at beta 1; the
    # posterior mean for a supervised one at its default small KL weight (a narrow posterior) and for a plain
    # model. With it (the default for these Gaussian denoisers), the posterior mean: its better pilot.
    mmse, mean = "MMSE over 16 posterior samples (seed 0)", "posterior mean"
    for run, estimate, wiener in (("a", mean, False), ("b", mmse, False), ("e", mmse, False), ("d", mean, None),
                                  ("b", mean, None), ("e", mean, None)):
        started = []
        denoise_files(tmp_path / run, [tmp_path / "data"], tmp_path / f"out-{run}-{wiener}", device="cpu",
                      wiener=wiener, callback=lambda e: started.append(e) if isinstance(e, Started) else None)
        mirrored = ", averaged with its mirror image's" if run != "d" else ""  # a denoiser trains with --flip
        assert started[0].info["estimate"] == estimate + mirrored, run
        assert (started[0].info["wiener"] == "off") == (wiener is False or run == "d"), run
