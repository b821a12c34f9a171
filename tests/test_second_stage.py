"""The second-stage prior over a latent map: the net, its training, the checkpoint, and the commands that use it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_blobs
from vaetool.checkpoint import load_model, read_metadata, save_model, save_prior
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.errors import CheckpointError, ConfigError
from vaetool.models.base import build_model
from vaetool.models.prior import FittedPrior, prior_levels
from vaetool.models.second_stage import SecondStageNet, SecondStagePrior, halvings, second_stage_levels
from vaetool.training.fit_prior import planned_prior
from vaetool.training.second_stage import fit_second_stage

runner = CliRunner()
SPATIAL = ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=2, downsample=4)


def _maps(count=64, channels=3, size=8, seed=0):
    """Smooth random maps with a shared structure (a few templates mixed): something a code can capture."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, channels, size, size, generator=g).cumsum(-1).cumsum(-2) / size
    weights = torch.randn(count, 4, generator=g)
    return torch.einsum("nk,kchw->nchw", weights, templates) + 0.05 * torch.randn(count, channels, size, size, generator=g)


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 8, 8), (1, 10, 10), (4, 7, 12), (2, 3, 3), (8, 16, 16)])
def test_the_net_keeps_the_map_shape_and_its_loss_has_gradients(shape):
    torch.manual_seed(0)
    net = SecondStageNet(*shape, latent=8, features=8)
    y = torch.randn(5, *shape)
    mu, logvar = net.encode(y)
    assert mu.shape == logvar.shape == (5, 8)
    assert net.decode(mu).shape == (5, *shape)
    loss = net.loss(y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert halvings(*shape[1:])[-1][0] <= 4 and halvings(*shape[1:])[-1][1] <= 4


def test_the_loss_is_the_negative_elbo_of_a_gaussian_with_scale_gamma():
    torch.manual_seed(0)
    net = SecondStageNet(2, 4, 4, latent=3, features=4)
    with torch.no_grad():
        net.log_gamma.fill_(math.log(0.5))
    y = torch.randn(6, 2, 4, 4)
    torch.manual_seed(1)
    loss = net.loss(y)
    torch.manual_seed(1)
    mu, logvar = net.encode(y)
    u = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    reconstruction = -torch.distributions.Normal(net.decode(u), 0.5).log_prob(y).flatten(1).sum(1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                           torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(loss, (reconstruction + kl).mean(), rtol=1e-5)


def test_training_lowers_the_loss_and_the_same_seed_gives_the_same_prior():
    maps = _maps()
    short = fit_second_stage(maps, level="z", steps=5, seed=0, code=8, features=16, batch=32)
    fit = fit_second_stage(maps, level="z", steps=300, seed=0, code=8, features=16, batch=32)
    assert fit.prior.steps == 300 and fit.latents == 64 and fit.loss < short.loss - 50
    again = fit_second_stage(maps, level="z", steps=300, seed=0, code=8, features=16, batch=32)
    first, second = fit.prior.to_tensors(), again.prior.to_tensors()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = fit_second_stage(maps, level="z", steps=300, seed=1, code=8, features=16, batch=32)
    assert not torch.equal(other.prior.to_tensors()["prior.z.stage2.net.log_gamma"], first["prior.z.stage2.net.log_gamma"])


def test_samples_are_deterministic_for_a_seed_and_lie_where_the_maps_do():
    maps = _maps(count=96)
    prior = fit_second_stage(maps, level="z", steps=300, seed=0, code=8, features=16, batch=32).prior
    draw = prior.sample(40, generator=torch.Generator().manual_seed(5))
    assert draw.shape == (40, 3, 8, 8) and draw.dtype == torch.float32
    assert torch.equal(draw, prior.sample(40, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(draw, prior.sample(40, generator=torch.Generator().manual_seed(6)))
    # Per-channel spread within a factor of two of the maps', and far nearer to them than N(0, I) maps are.
    ratio = draw.std((0, 2, 3)) / maps.std((0, 2, 3))
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio
    nearest = torch.cdist(draw.flatten(1), maps.flatten(1)).min(1).values.mean()
    noise = torch.cdist(torch.randn(40, 192), maps.flatten(1)).min(1).values.mean()
    assert nearest < 0.7 * noise
    cold = prior.sample(40, generator=torch.Generator().manual_seed(5), temperature=0.0)  # the components' means
    assert len(torch.unique(cold.flatten(1), dim=0)) <= prior.components


def test_a_vector_latent_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="latent maps"):
        fit_second_stage(torch.randn(50, 16), level="z", steps=2)
    vector = build_model(ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)))
    with pytest.raises(ConfigError, match="--prior mixture"):
        planned_prior("second-stage", vector)
    assert planned_prior("auto", vector) == "mixture"
    assert planned_prior("auto", build_model(SPATIAL)) == "second-stage"
    assert planned_prior("mixture", build_model(SPATIAL)) == "mixture"
    assert planned_prior("none", build_model(SPATIAL)) is None
    with pytest.raises(ConfigError, match="unknown prior"):
        planned_prior("flow", vector)


def test_the_checkpoint_round_trip_keeps_the_samples_and_the_format_says_so(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPATIAL).eval()
    maps = _maps(count=40, channels=2, size=4)
    prior = fit_second_stage(maps, level="z", steps=20, seed=0, code=8, features=8).prior
    path = save_model(tmp_path / "m.safetensors", model, prior=prior)
    assert read_metadata(path)["format_version"] == "3"
    loaded = load_model(path)
    assert isinstance(loaded.prior, SecondStagePrior) and loaded.prior.shape == (2, 4, 4)
    assert loaded.prior.describe()["kind"] == "second-stage" and loaded.prior.steps == 20
    draw = lambda p: p.sample(6, generator=torch.Generator().manual_seed(2))  # noqa: E731
    assert torch.equal(draw(loaded.prior), draw(prior))
    tensors = prior.to_tensors("prior.")
    assert second_stage_levels(tensors) == ["z"] and prior_levels(tensors) == []  # the code mixture is not a level
    # Replacing it with a mixture drops every second-stage tensor and the format goes back to 2.
    mixture = FittedPrior(level="z", shape=(2, 4, 4), weights=torch.ones(1), means=torch.zeros(1, 32),
                          scale_tril=torch.eye(32)[None])
    assert mixture.components == 1
    save_prior(path, mixture)
    assert read_metadata(path)["format_version"] == "2" and isinstance(load_model(path).prior, FittedPrior)


def test_a_damaged_second_stage_is_a_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(SPATIAL).eval()
    prior = fit_second_stage(_maps(count=40, channels=2, size=4), level="z", steps=3, seed=0, code=8, features=8).prior
    path = save_model(tmp_path / "m.safetensors", model, prior=prior)
    tensors = load_file(path)
    del tensors["prior.z.stage2.net.log_gamma"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata)
    with pytest.raises(CheckpointError, match="second-stage prior .* fit-prior --second-stage"):
        load_model(tmp_path / "bad.safetensors")


def _spatial_run(tmp_path, *extra):
    data = tmp_path / "data"
    make_blobs(data, count=24)
    args = ["train", str(data), "-o", str(tmp_path / "run"), "--no-report", "--no-disk-cache", "--image-size", "16",
            "--model", "spatial", "--widths", "8,16", "--latent-channels", "2", "--batch-size", "4", "--device", "cpu",
            *extra]
    return data, runner.invoke(app, args)


def test_train_fits_a_second_stage_for_a_spatial_map_and_sample_draws_from_it(tmp_path):
    data, result = _spatial_run(tmp_path, "--steps", "3", "--json")
    assert result.exit_code == 0, result.output
    assert "second-stage prior on latent z (2, 4, 4): 12 steps" in result.stderr  # 4 per training step
    summary = json.loads(result.stdout)
    assert summary["prior"]["kind"] == "second-stage" and summary["prior"]["steps"] == 12
    prior = load_model(tmp_path / "run").prior
    assert isinstance(prior, SecondStagePrior) and isinstance(load_model(tmp_path / "run" / "last.safetensors").prior,
                                                              SecondStagePrior)
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    for out in (out1, out2):
        drawn = runner.invoke(app, ["sample", str(tmp_path / "run"), "-n", "3", "-o", str(out), "--seed", "4"])
        assert drawn.exit_code == 0, drawn.output
    assert [p.read_bytes() for p in sorted(out1.iterdir())] == [p.read_bytes() for p in sorted(out2.iterdir())]
    shown = runner.invoke(app, ["info", str(tmp_path / "run")])
    assert "second stage over latent z (2, 4, 4): a VAE of 12 steps" in shown.stdout


def test_train_prior_options_and_the_time_share(tmp_path):
    data, result = _spatial_run(tmp_path, "--steps", "2", "--prior", "mixture")
    assert result.exit_code == 0, result.output
    assert isinstance(load_model(tmp_path / "run").prior, FittedPrior)
    data, result = _spatial_run(tmp_path, "--steps", "2", "--prior-steps", "500", "--force")
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "run").prior.steps == 500
    assert "second stage step 500/500 loss" in result.stderr  # its progress, in the training display
    from vaetool.config import TrainConfig
    from vaetool.training.trainer import Trainer
    from vaetool.training.distributed import init_world

    trainer = Trainer([str(data)], tmp_path / "timed", world=init_world("cpu"), device=torch.device("cpu"),
                      precision="fp32", model_config=SPATIAL, train_config=TrainConfig(time_limit=30.0, batch_size=4),
                      detect_channels=True, resume=False, force=False, strict=False, cache_dir=None, cache_memory=None,
                      compile=False, workers=0, callback=lambda event: None, invocation=None)
    assert trainer.prior_kind == "second-stage" and trainer.time_limit == pytest.approx(20.0)
    assert trainer.prior_seconds == pytest.approx(10.0)


def test_fit_prior_second_stage_for_an_earlier_checkpoint_and_its_errors(tmp_path):
    data, result = _spatial_run(tmp_path, "--steps", "2", "--prior", "mixture")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    before = load_model(run).identity
    fitted = runner.invoke(app, ["fit-prior", str(run), str(data), "--second-stage", "--steps", "9", "--json", "-q"])
    assert fitted.exit_code == 0, fitted.output
    record = json.loads(fitted.stdout)
    assert record["prior"]["kind"] == "second-stage" and record["prior"]["steps"] == 9
    loaded = load_model(run)
    assert isinstance(loaded.prior, SecondStagePrior) and loaded.identity == before
    vector = tmp_path / "vector"
    made = runner.invoke(app, ["train", str(data), "-o", str(vector), "--model", "vector", "--steps", "1", "--no-report",
                               "--image-size", "16", "--widths", "8,16", "--latent-dim", "4", "--batch-size", "4",
                               "--device", "cpu"])
    assert made.exit_code == 0, made.output
    refused = runner.invoke(app, ["fit-prior", str(vector), str(data), "--second-stage"])
    assert refused.exit_code == 1 and "latent maps" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
