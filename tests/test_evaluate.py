"""Evaluation: IWAE against quadrature, likelihoods against torch.distributions, PSNR/SSIM by hand, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import distributions as D
from typer.testing import CliRunner

from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.errors import DataError
from vaetool.events import Failed, Progress, Started, Warning
from vaetool.inference.evaluate import _Moments, active_units, bits_per_dim, evaluate, iwae_bound, psnr, ssim
from vaetool.models.vector import VAE

LN2, LN256 = math.log(2), math.log(256)


# --------------------------------------------------------------- a model small enough to integrate


def _log_lik(model: VAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) for each row of z, from torch.distributions (independent of VAE.log_likelihood)."""
    mean_logits = model.decode(z.float()).double()  # (N, C, H, W)
    if model.config.likelihood == "bernoulli":
        dist = D.Bernoulli(logits=mean_logits)
    else:
        dist = D.Normal(torch.sigmoid(mean_logits), model.config.fixed_scale)
    return dist.log_prob(x.double().expand_as(mean_logits)).flatten(1).sum(1)


@torch.no_grad()
def integrable(latent_dim: int, likelihood: str = "gaussian"):
    """A 4x4 gray VAE with a 1-2 dim latent; log p(x) and the ELBO by quadrature on a grid.

    The encoder is replaced by a fixed q(z|x): the true posterior's moments, shifted by half a
    standard deviation and 1.5 times as wide, so the ELBO is visibly loose and IWAE has work to do.
    """
    torch.manual_seed(latent_dim)
    config = ModelConfig(image_size=4, channels=1, latent_dim=latent_dim, widths=(2,), blocks=0,
                         likelihood=likelihood, decoder_scale="fixed", fixed_scale=0.2)
    model = VAE(config).eval()
    for p in model.decoder.parameters():
        p.mul_(3.0)  # a sharper decoder: a posterior narrower than the prior
    gen = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (1, 1, 4, 4), generator=gen).to(torch.uint8)
    if likelihood == "bernoulli":
        pixels = (pixels >= 128).to(torch.uint8) * 255
    x = pixels.float() / 255
    n = 4001 if latent_dim == 1 else 301
    grid = torch.linspace(-8, 8, n, dtype=torch.float64)
    step = float(grid[1] - grid[0])
    z = grid[:, None] if latent_dim == 1 else torch.cartesian_prod(grid, grid)  # (N, D)
    log_joint = _log_lik(model, x, z) + D.Normal(0.0, 1.0).log_prob(z).sum(1)  # (N,)
    log_px = float(torch.logsumexp(log_joint, 0)) + latent_dim * math.log(step)
    post = torch.softmax(log_joint, 0)[:, None]
    mean = (post * z).sum(0)
    std = (post * (z - mean) ** 2).sum(0).sqrt()
    q_mu, q_std = mean + 0.5 * std, 1.5 * std
    model.encoder.head.weight.zero_()
    model.encoder.head.bias.copy_(torch.cat([q_mu, 2 * q_std.log()]).float())
    log_q = D.Normal(q_mu, q_std).log_prob(z).sum(1)
    elbo = float((log_q.exp() * (log_joint - log_q)).sum()) * step**latent_dim
    return model, pixels, x, log_px, elbo


def _iwae_mean(model, x, k, reps, seed):
    """Mean and standard error over `reps` independent IWAE_k estimates."""
    values = iwae_bound(model, x.expand(reps, *x.shape[1:]), k, generator=torch.Generator().manual_seed(seed),
                        chunk=k)
    return float(values.mean()), float(values.std() / math.sqrt(reps))


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_iwae_approaches_log_px_from_quadrature(latent_dim):
    model, _, x, log_px, elbo = integrable(latent_dim)
    assert elbo < log_px - 0.2  # the posterior mismatch is real
    gaps = []
    for k in (1, 8, 64, 1024):
        mean, se = _iwae_mean(model, x, k, reps=200, seed=k)
        gaps.append(log_px - mean)
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert abs(gaps[3]) < 0.01 + 4 * se, gaps


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_elbo_below_iwae_k_below_iwae_2k_in_expectation(latent_dim):
    model, _, x, log_px, elbo = integrable(latent_dim)
    means = {}
    for k in (1, 2, 4, 8):
        means[k], se = _iwae_mean(model, x, k, reps=600, seed=100 + k)
        assert means[k] <= log_px + 4 * se
    _, se1 = _iwae_mean(model, x, 1, reps=600, seed=1)
    assert abs(means[1] - elbo) < 4 * se1  # IWAE_1 is the ELBO
    assert elbo < means[2] < means[4] < means[8]


@pytest.mark.parametrize("likelihood,latent_dim", [("gaussian", 2), ("bernoulli", 1)])
def test_bits_per_dim_matches_quadrature_converted_by_hand(likelihood, latent_dim):
    model, pixels, _, log_px, _ = integrable(latent_dim, likelihood)
    copies = pixels.expand(60, -1, -1, -1)  # 60 independent estimates of the same image's -log p(x)
    result = evaluate(model, copies, iw_samples=500, batch_size=60, device="cpu")
    assert result.dims == 16
    tolerance = 0.005 + 4 * result.iwae_nll_sem
    assert abs(result.iwae_nll - (-log_px)) < tolerance
    offset = 0.0 if likelihood == "bernoulli" else 16 * LN256  # dequantization: [0, 1] -> [0, 256)
    by_hand = (-log_px + offset) / (16 * LN2)
    assert result.bits_per_dim == pytest.approx(by_hand, abs=tolerance / (16 * LN2))
    assert result.bits_per_dim == pytest.approx((result.iwae_nll + offset) / (16 * LN2), rel=1e-12)


def test_bits_per_dim_hand_values():
    assert bits_per_dim(0.0, 1, "gaussian") == pytest.approx(8.0)  # density 1 on [0, 1] = 8 bits per pixel
    assert bits_per_dim(-100 * LN2, 100, "laplace") == pytest.approx(7.0)  # density 2 per pixel: one bit less
    assert bits_per_dim(100 * LN2, 100, "bernoulli") == pytest.approx(1.0)  # no dequantization term
    values = bits_per_dim(torch.tensor([0.0, 12 * LN2]), 12, "gaussian")
    torch.testing.assert_close(values, torch.tensor([8.0, 9.0]))


# ------------------------------------------------------ likelihoods and KL against torch.distributions


def _tiny(likelihood: str, **kw) -> VAE:
    torch.manual_seed(0)
    scale = {} if likelihood == "bernoulli" else {"decoder_scale": "fixed", "fixed_scale": 0.3}
    return VAE(ModelConfig(image_size=8, channels=3, latent_dim=3, widths=(4,), likelihood=likelihood,
                           **scale, **kw)).eval()


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace", "bernoulli"])
def test_iwae_log_weights_match_torch_distributions(likelihood):
    model = _tiny(likelihood)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if likelihood == "bernoulli":
        x = (x > 0.5).float()
    k = 5
    got = iwae_bound(model, x, k, generator=torch.Generator().manual_seed(2), chunk=2)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)  # the same draws: image by image, K x latent each
        noise = torch.stack([torch.randn((k, 3), generator=gen) for _ in range(3)], dim=1)  # (K, B, D)
        posterior = model.encode(x)
        q = D.Normal(posterior.mu, (0.5 * posterior.logvar).exp())
        z = posterior.mu + q.scale * noise  # (K, B, D)
        logits = model.decode(z.reshape(-1, 3)).view(k, *x.shape)
        mean = torch.sigmoid(logits)
        if likelihood == "gaussian":
            decoder = D.Normal(mean, 0.3)
        elif likelihood == "laplace":
            decoder = D.Laplace(mean, 0.3)
        else:
            decoder = D.Bernoulli(logits=logits)
        log_w = decoder.log_prob(x).flatten(2).sum(2) + D.Normal(0.0, 1.0).log_prob(z).sum(2) - q.log_prob(z).sum(2)
        want = torch.logsumexp(log_w.double(), 0) - math.log(k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    again = iwae_bound(model, x, k, generator=torch.Generator().manual_seed(2), chunk=k)  # chunking is invisible
    torch.testing.assert_close(got, again, rtol=1e-6, atol=1e-4)  # only float32 rounding differs


def test_evaluate_kl_and_parts_match_torch_distributions():
    model = _tiny("gaussian")
    pixels = torch.randint(0, 256, (5, 3, 8, 8), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    result = evaluate(model, pixels, iw_samples=4, batch_size=2, device="cpu")
    with torch.no_grad():
        posterior = model.encode(pixels.float() / 255)
        kl = D.kl_divergence(D.Normal(posterior.mu, (0.5 * posterior.logvar).exp()), D.Normal(0.0, 1.0)).sum(1)
        recon = model.mean_image(model.decode(posterior.mu))
    assert result.images == 5 and result.kl == pytest.approx(float(kl.mean()), rel=1e-5)
    assert result.neg_elbo == pytest.approx(result.recon + result.kl)
    mse = (recon - pixels.float() / 255).pow(2).flatten(1).mean(1)
    assert result.mse == pytest.approx(float(mse.mean()), rel=1e-5)
    assert result.psnr == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-5)
    assert result.decoder_scale == pytest.approx(0.3)


# ------------------------------------------------------------------------------- PSNR, SSIM by hand


def test_psnr_by_hand():
    a = torch.zeros(3, 1, 2, 2)
    b = torch.stack([torch.full((1, 2, 2), 0.1), torch.tensor([[[0.2, 0.0], [0.0, 0.2]]]), torch.zeros(1, 2, 2)])
    values = psnr(b, a)
    assert values[0] == pytest.approx(20.0)  # MSE 0.01
    assert values[1] == pytest.approx(10 * math.log10(1 / 0.02))  # MSE (0.04 + 0.04) / 4
    assert values[2] == pytest.approx(100.0)  # identical: capped, not infinite
    assert psnr(b[:1] * 255, a[:1], data_range=255.0)[0] == pytest.approx(20.0)


def test_ssim_of_constant_images_by_hand():
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01**2
    # No variance anywhere: SSIM is the luminance term alone, (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    assert float(ssim(a, b)[0]) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))
    noise = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim(noise, noise), torch.ones(2, dtype=torch.float64))
    # channels are averaged: one identical channel (1.0) and one pair of constants
    pair_a, pair_b = torch.cat([noise[:1, :1], a], 1), torch.cat([noise[:1, :1], b], 1)
    assert float(ssim(pair_a, pair_b)[0]) == pytest.approx((1.0 + float(ssim(a, b)[0])) / 2)


def test_ssim_single_window_matches_the_formula():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (11, 11)), rng.uniform(0, 1, (11, 11))
    y = 0.6 * x + 0.4 * y  # correlated, so every term matters
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()  # the 11x11 Gaussian window, one position on an 11x11 image
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    want = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim(torch.tensor(x)[None, None], torch.tensor(y)[None, None])
    assert float(got[0]) == pytest.approx(want, rel=1e-10)
    assert float(ssim(torch.tensor(y)[None, None], torch.tensor(x)[None, None])[0]) == pytest.approx(want)
    assert want < 0.95  # a real difference, not the trivial value 1


def test_ssim_on_images_smaller_than_the_window():
    a = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert bool((ssim(a, 1 - a) < 0.5).all())


# ------------------------------------------------------------------------------------ active units


def test_active_units_by_hand_and_streaming():
    mus = torch.tensor([[-1.0, -0.05, -0.2, 3.0], [1.0, 0.05, 0.2, 3.0]])  # variances 1, 0.0025, 0.04, 0
    assert active_units(mus) == 2
    assert active_units(mus, threshold=0.05) == 1
    data = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([2, 1, .3, .1, .05, 0]) + 5
    moments = _Moments()
    for part in data.split(7):
        moments.update(part)
    torch.testing.assert_close(moments.variance(), data.double().var(0, unbiased=False))


def test_active_units_count_collapsed_dimensions():
    model = _tiny("gaussian")
    with torch.no_grad():  # latent 2 ignores the image: its mean is constant over the data
        model.encoder.head.weight[2].zero_()
    pixels = torch.randint(0, 256, (12, 3, 8, 8), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    result = evaluate(model, pixels, iw_samples=2, batch_size=5, device="cpu")
    with torch.no_grad():
        mus = model.encode(pixels.float() / 255).mu
    assert result.active_units == active_units(mus) and result.active_units < 3


# --------------------------------------------------------------------------------------- the engine


def test_evaluate_is_repeatable_with_a_seed():
    model = _tiny("gaussian")
    pixels = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    first = evaluate(model, pixels, iw_samples=8, batch_size=4, seed=1, device="cpu").to_dict()
    again = evaluate(model, pixels, iw_samples=8, batch_size=4, seed=1, device="cpu").to_dict()
    other = evaluate(model, pixels, iw_samples=8, batch_size=4, seed=2, device="cpu").to_dict()
    assert first == again
    assert first["iwae_nll"] != other["iwae_nll"]
    for key in ("kl", "mse", "psnr", "ssim", "active_units"):  # no sampling in these
        assert first[key] == pytest.approx(other[key])


def test_evaluate_rejects_mismatched_tensors_and_flags_non_binary_bernoulli():
    with pytest.raises(DataError, match="tensor"):
        evaluate(_tiny("gaussian"), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), device="cpu")
    events = []
    gray = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    result = evaluate(_tiny("bernoulli"), gray, iw_samples=2, device="cpu", callback=events.append)
    assert result.warnings and {Started, Progress, Warning} <= {type(e) for e in events}
    binary = evaluate(_tiny("bernoulli"), (gray > 50).to(torch.uint8) * 255, iw_samples=2, device="cpu")
    assert not binary.warnings and binary.decoder_scale is None


def test_evaluate_folder_skips_bad_files(blob_folder, tmp_path):
    (blob_folder / "broken.png").write_bytes(b"not a png")
    ckpt = save_model(tmp_path / "m.safetensors", _tiny_rgb16())
    events = []
    result = evaluate(ckpt, [blob_folder], iw_samples=3, batch_size=5, device="cpu", callback=events.append)
    assert result.images == 12 and [p.endswith("broken.png") for p, _ in result.failures] == [True]
    assert [e.input for e in events if isinstance(e, Failed)] == [p for p, _ in result.failures]  # as everywhere
    assert result.checkpoint == str(ckpt) and math.isfinite(result.iwae_nll)


# ---------------------------------------------------------------------------------------------- CLI


def _tiny_rgb16() -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(image_size=16, channels=3, latent_dim=4, widths=(8, 16)))


@pytest.fixture
def checkpoint(tmp_path):
    return save_model(tmp_path / "model.safetensors", _tiny_rgb16())


def test_cli_table_json_and_exit_codes(blob_folder, checkpoint):
    runner = CliRunner()
    table = runner.invoke(app, ["eval", str(checkpoint), str(blob_folder), "-k", "4", "--device", "cpu", "-q"])
    assert table.exit_code == 0, table.stderr
    assert "-log p(x) IWAE" in table.stdout and "bits/dim" in table.stdout and "SSIM" in table.stdout
    assert table.stderr == ""
    as_json = runner.invoke(app, ["eval", str(checkpoint), str(blob_folder), "-k", "4", "--device", "cpu",
                                  "--json", "-q"])
    assert as_json.exit_code == 0
    lines = as_json.stdout.splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["images"] == 12 and data["iw_samples"] == 4 and data["failures"] == []
    assert data["bits_per_dim"] == pytest.approx(bits_per_dim(data["iwae_nll"], 768, "gaussian"))


def test_cli_partial_failure_exits_3_and_names_the_file(blob_folder, checkpoint):
    (blob_folder / "broken.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(blob_folder), "-k", "2", "--device", "cpu",
                                      "--json"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["images"] == 12
    assert "broken.png" in result.stderr and "1 of 13" in result.stderr


def test_cli_reads_paths_from_stdin_and_reports_errors(blob_folder, checkpoint, tmp_path):
    runner = CliRunner()
    paths = "\n".join(str(p) for p in sorted(blob_folder.glob("*.png"))[:3]) + "\n"
    piped = runner.invoke(app, ["eval", str(checkpoint), "-", "-k", "2", "--device", "cpu", "--json"], input=paths)
    assert piped.exit_code == 0 and json.loads(piped.stdout)["images"] == 3
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope"), str(blob_folder)])
    assert missing.exit_code == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error:") and "nope" in missing.stderr
