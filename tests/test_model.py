"""The VAE's shapes, gradients, KL and likelihoods against independent computations."""

import math

import pytest
import torch
from torch import distributions as D

from vaetool.config import ModelConfig, TrainConfig, Corruption
from vaetool.errors import ConfigError
from vaetool.models.base import DiagonalGaussian, elbo_loss
from vaetool.models.vector import VAE


def tiny(**kw):
    base = dict(image_size=16, channels=3, latent_dim=4, widths=(8, 16))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("size,channels,widths", [(16, 1, (8, 16)), (32, 3, (8, 16)), (24, 3, (8,)), (32, 1, (4, 8, 16))])
def test_shapes_and_every_parameter_gets_a_gradient(size, channels, widths):
    torch.manual_seed(0)
    model = VAE(tiny(image_size=size, channels=channels, widths=widths))
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.logits.shape == x.shape
    assert out.latents["z"].shape == (2, 4)
    terms = elbo_loss(model, x, out)
    assert terms.recon.shape == (2,) and terms.kl.shape == (2,)
    assert torch.isfinite(terms.loss)
    terms.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_image_size_must_divide():
    with pytest.raises(ConfigError, match="multiple of 4"):
        ModelConfig(image_size=30, widths=(8, 16))


def test_kl_matches_closed_form_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5) * 0.5
    q = DiagonalGaussian(mu, logvar)
    reference = D.kl_divergence(D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(q.kl(), reference)
    g = torch.Generator().manual_seed(1)
    z = torch.stack([q.sample(g) for _ in range(20000)])  # (S, B, D)
    prior = D.Normal(0.0, 1.0).log_prob(z).sum(-1)
    monte_carlo = (q.log_prob(z) - prior).mean(0)
    torch.testing.assert_close(monte_carlo, reference, atol=0.08, rtol=0.03)


def test_sample_uses_generator_and_mode_is_mean():
    q = DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 3))
    a = q.sample(torch.Generator().manual_seed(5))
    b = q.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, q.sample(torch.Generator().manual_seed(6)))
    assert torch.equal(q.mode(), q.mu)


def test_logvar_is_clamped():
    q = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[1e4, -1e4]]))
    assert torch.isfinite(q.kl()).all()


@pytest.mark.parametrize("likelihood,scale", [("gaussian", "learned"), ("gaussian", "fixed"), ("laplace", "learned"),
                                              ("bernoulli", "learned")])
def test_likelihoods_match_torch_distributions(likelihood, scale):
    torch.manual_seed(0)
    model = VAE(tiny(likelihood=likelihood, decoder_scale=scale, fixed_scale=0.2))
    if scale == "learned" and likelihood != "bernoulli":
        with torch.no_grad():
            model.log_scale.fill_(math.log(0.3))
    x = torch.rand(2, 3, 16, 16)
    logits = torch.randn(2, 3, 16, 16)
    mean = torch.sigmoid(logits)
    sigma = 0.2 if scale == "fixed" else 0.3
    if likelihood == "gaussian":
        ref = D.Normal(mean, sigma).log_prob(x)
    elif likelihood == "laplace":
        ref = D.Laplace(mean, sigma).log_prob(x)
    else:
        ref = D.Bernoulli(logits=logits, validate_args=False).log_prob(x)  # soft targets, as in training
    torch.testing.assert_close(model.log_likelihood(x, logits), ref.flatten(1).sum(1))


def test_optimal_scale_is_the_batch_rmse():
    model = VAE(tiny(decoder_scale="optimal")).train()
    x = torch.rand(4, 3, 16, 16)
    logits = torch.randn(4, 3, 16, 16)
    rmse = (x - torch.sigmoid(logits)).pow(2).mean().sqrt()
    ref = D.Normal(torch.sigmoid(logits), rmse).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_likelihood(x, logits), ref)
    # the running value used at evaluation: set by the first batch, then averaged
    torch.testing.assert_close(model.log_scale, rmse.log())
    model.log_likelihood(x, torch.zeros_like(logits))
    rmse2 = (x - 0.5).pow(2).mean().sqrt()
    torch.testing.assert_close(model.log_scale, (rmse.log() + rmse2.log()) / 2)
    model.eval()
    frozen = D.Normal(torch.sigmoid(logits), model.log_scale.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_likelihood(x, logits), frozen)
    assert model.scale_updates == 2


def test_beta_zero_is_plain_autoencoder_and_free_bits_floor():
    torch.manual_seed(0)
    model = VAE(tiny())
    x = torch.rand(2, 3, 16, 16)
    out = model(x, sample=False)
    assert torch.equal(out.latents["z"], out.posterior.mu)
    t0 = elbo_loss(model, x, out, beta=0.0)
    torch.testing.assert_close(t0.loss, t0.recon.mean())
    t_fb = elbo_loss(model, x, out, beta=1.0, free_bits=100.0)
    torch.testing.assert_close(t_fb.loss, t0.recon.mean() + 100.0 * 4)


def test_train_config_round_trip_and_validation():
    cfg = TrainConfig(steps=5, corruptions=(Corruption.parse("gaussian:0.05-0.2"), Corruption.parse("mask:0.25")))
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert str(again.corruptions[0]) == "gaussian:0.05-0.2"
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError):
        Corruption.parse("blur:3")
    with pytest.raises(ConfigError):
        Corruption.parse("mask:1.5")
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()
