"""The model families (vector, spatial, hierarchical) behind one interface: shapes, gradients, KLs, bounds, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from vaetool.config import ModelConfig
from vaetool.errors import ConfigError, DataError
from vaetool.models.base import DiagonalGaussian, build_model, elbo_loss
from vaetool.models.hierarchical import TOP, HierarchicalVAE

KINDS = ("vector", "spatial", "hierarchical")


def tiny(kind: str, **kw) -> ModelConfig:
    base = dict(kind=kind, image_size=16, channels=3, latent_dim=4, latent_channels=3, widths=(8, 16), downsample=4)
    if kind == "hierarchical":
        base["downsample"] = 2  # levels at 1/4 and 1/2
    base.update(kw)
    return ModelConfig(**base)


def seeded(config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config)


def noise_for(model, batch: int, height: int, width: int, seed: int = 0, k: int | None = None):
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if k is None else (k, batch)
    return {name: torch.randn(*lead, *shape, generator=g) for name, shape in model.latent_shapes(height, width).items()}


def capture_distributions(model: HierarchicalVAE, x: torch.Tensor, noise):
    """Run the top-down pass with a pick that records each level's q and p; returns (pass, {level: (q, p, z)})."""
    posterior = model.encode(x)
    seen = {}

    def pick(name, q, p):
        z = q.sample(noise=noise[name])
        seen[name] = (q, p, z)
        return z

    top = posterior.top.sample(noise=noise[TOP])
    result = model.top_down(top, tuple(posterior.skips[-1].shape[-2:]), pick, top_q=posterior.top,
                            skips=posterior.skips, densities=True)
    return result, seen, posterior


CASES = [("vector", 16, 1, {}), ("vector", 32, 3, {}),
         ("spatial", 16, 3, {}), ("spatial", 32, 1, dict(downsample=8, widths=(8, 16, 16))),
         ("spatial", 24, 3, dict(downsample=2, widths=(8,), patch=1)),
         ("hierarchical", 16, 3, {}), ("hierarchical", 32, 1, dict(widths=(8, 16, 16), downsample=4)),
         ("hierarchical", 32, 3, dict(level_cells=2, patch=1))]


@pytest.mark.parametrize("kind,size,channels,extra", CASES)
def test_shapes_no_nan_and_every_parameter_gets_a_gradient(kind, size, channels, extra):
    model = seeded(tiny(kind, image_size=size, channels=channels, **extra))
    x = torch.rand(2, channels, size, size)
    out = model(x, noise=noise_for(model, 2, size, size))
    assert out.logits.shape == x.shape and torch.isfinite(out.logits).all()
    shapes = model.latent_shapes(size, size)
    assert list(out.latents) == list(shapes) == list(out.kl_terms)
    for name, shape in shapes.items():
        assert out.latents[name].shape == (2, *shape) and out.kl_terms[name].shape == (2, *shape), name
    terms = elbo_loss(model, x, out)
    assert set(terms.kl_levels) == set(shapes) and torch.isfinite(terms.loss)
    terms.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_hierarchical_levels_are_named_by_factor_in_top_down_order():
    model = seeded(tiny("hierarchical", image_size=32, widths=(8, 16, 16), downsample=4, level_cells=2))
    assert list(model.latent_shapes(32, 48)) == [TOP, "z8", "z8_1", "z4", "z4_1"]
    assert model.latent_shapes(32, 48)["z4"] == (3, 8, 12) and model.latent_shapes(32, 48)[TOP] == (4,)
    assert model.vector_level == TOP and seeded(tiny("spatial")).vector_level is None


def test_each_level_kl_matches_torch_distributions():
    model = seeded(tiny("hierarchical", image_size=32, widths=(8, 16, 16), downsample=4))
    x = torch.rand(2, 3, 32, 32)
    noise = noise_for(model, 2, 32, 32)
    out = model(x, noise=noise)
    _, seen, posterior = capture_distributions(model, x, noise)
    top = posterior.top
    torch.testing.assert_close(out.kl_terms[TOP], D.kl_divergence(D.Normal(top.mu, top.std), D.Normal(0.0, 1.0)))
    for name, (q, p, z) in seen.items():
        reference = D.kl_divergence(D.Normal(q.mu, q.std), D.Normal(p.mu, p.std))  # (B, C, h, w)
        torch.testing.assert_close(out.kl_terms[name], reference, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out.latents[name], z)
    assert set(seen) == set(out.kl_terms) - {TOP}


def test_kl_between_gaussians_keeps_its_digits_near_zero():
    mu = torch.randn(4, 6, dtype=torch.float64)
    logvar = torch.randn(4, 6, dtype=torch.float64)
    q64 = DiagonalGaussian(mu + 1e-4, logvar + 1e-3)
    reference = D.kl_divergence(D.Normal(q64.mu, q64.std), D.Normal(mu, (0.5 * logvar).exp()))
    q = DiagonalGaussian(q64.mu.float(), q64.logvar.float())
    kl = q.kl_per_dim(DiagonalGaussian(mu.float(), logvar.float())).double()
    torch.testing.assert_close(kl, reference, rtol=0.02, atol=1e-9)


def log_weights(model, x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(K, B) log w = log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x)."""
    b = x.shape[0]
    drawn = model.importance_sample(model.encode(x), noise_for(model, b, *x.shape[-2:], seed=seed, k=k))
    target = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
    log_lik = model.log_likelihood(target, drawn.logits).view(k, b)
    return (log_lik + drawn.log_p - drawn.log_q).double()


def iwae(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


@pytest.mark.parametrize("kind", KINDS)
def test_iwae_bound_tightens_with_more_samples(kind):
    model = seeded(tiny(kind)).eval()
    x = torch.rand(4, 3, 16, 16)
    elbo, bound_k, bound_2k = [], [], []
    with torch.no_grad():
        for seed in range(6):
            log_w = log_weights(model, x, 16, seed)  # (2K, B): the first K give IWAE_K, all of them IWAE_2K
            elbo.append(log_w.mean(0))
            bound_k.append(iwae(log_w[:8]))
            bound_2k.append(iwae(log_w))
    elbo, bound_k, bound_2k = (torch.stack(v).mean() for v in (elbo, bound_k, bound_2k))
    assert elbo < bound_k < bound_2k


def test_importance_sample_agrees_with_the_posterior_and_torch_distributions():
    model = seeded(tiny("hierarchical")).eval()
    x = torch.rand(2, 3, 16, 16)
    noise = noise_for(model, 2, 16, 16, k=3)
    with torch.no_grad():
        posterior = model.encode(x)
        drawn = model.importance_sample(posterior, noise)
        latents = posterior.sample(noise=noise)
        assert all(torch.equal(latents[n], drawn.latents[n]) for n in latents)
        torch.testing.assert_close(posterior.log_prob(latents), drawn.log_q)
        torch.testing.assert_close(posterior.prior_log_prob(latents), drawn.log_p)
        flat = {n: v.flatten(0, 1) for n, v in latents.items()}
        torch.testing.assert_close(model.decode(flat), drawn.logits)
        # sample k = 2 of each image against torch.distributions, level by level
        one = {n: v[2] for n, v in noise.items()}
        _, seen, post = capture_distributions(model, x, one)
        ref_q = D.Normal(post.top.mu, post.top.std).log_prob(drawn.latents[TOP][2]).sum(1)
        ref_p = D.Normal(0.0, 1.0).log_prob(drawn.latents[TOP][2]).sum(1)
        for q, p, z in seen.values():
            ref_q = ref_q + D.Normal(q.mu, q.std).log_prob(z).flatten(1).sum(1)
            ref_p = ref_p + D.Normal(p.mu, p.std).log_prob(z).flatten(1).sum(1)
        torch.testing.assert_close(drawn.log_q[2], ref_q, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(drawn.log_p[2], ref_p, rtol=1e-5, atol=1e-3)


def test_monte_carlo_kl_of_the_log_densities_matches_the_reported_kl():
    model = seeded(tiny("hierarchical")).eval()
    x = torch.rand(1, 3, 16, 16)
    k = 4000
    with torch.no_grad():
        noise = noise_for(model, 1, 16, 16, seed=3, k=k)
        drawn = model.importance_sample(model.encode(x), noise)
        out = model(x.expand(k, -1, -1, -1), noise={n: v[:, 0] for n, v in noise.items()})
    reported = sum(kl.flatten(1).sum(1) for kl in out.kl_terms.values())  # (K,) analytic along each path
    monte_carlo = drawn.log_q - drawn.log_p  # (K, 1)
    torch.testing.assert_close(monte_carlo.mean(), reported.mean(), rtol=0.03, atol=0.5)


def test_a_spatial_model_takes_a_100x60_image_whole():
    model = seeded(tiny("spatial")).eval()  # f = 4 divides both 60 and 100
    x = torch.rand(1, 3, 60, 100)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mu.shape == (1, 3, 15, 25)
        recon = model.reconstruct(x)
        prior = model.sample_prior(2, size=(60, 100), generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    assert model.decode(prior).shape == (2, 3, 60, 100)
    assert model.latent_shapes(60, 100) == {"z": (3, 15, 25)}
    with pytest.raises(DataError, match="multiples of 4; pad or crop it to 104x60"):
        model.encode(torch.rand(1, 3, 102, 60))


def test_a_hierarchical_model_takes_any_multiple_of_its_coarsest_factor():
    model = seeded(tiny("hierarchical")).eval()
    assert model.size_multiple == 4
    x = torch.rand(2, 3, 20, 36)
    with torch.no_grad():
        out = model(x, sample=False)
        assert out.logits.shape == x.shape and out.latents["z2"].shape == (2, 3, 10, 18)
        assert model.decode(model.sample_prior(1, size=(20, 36))).shape == (1, 3, 20, 36)
    with pytest.raises(DataError, match="multiples of 4"):
        model.latent_shapes(18, 36)
    vector = seeded(tiny("vector"))
    assert vector.size_multiple is None
    with pytest.raises(DataError, match="takes 16x16 images"):
        vector.check_size(32, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_prior_is_deterministic_for_a_seed_and_honours_temperatures(kind):
    model = seeded(tiny(kind)).eval()
    names = list(model.latent_shapes(16, 16))
    a = model.sample_prior(3, generator=torch.Generator().manual_seed(7))
    b = model.sample_prior(3, generator=torch.Generator().manual_seed(7))
    c = model.sample_prior(3, generator=torch.Generator().manual_seed(8))
    assert list(a) == names and all(torch.equal(a[n], b[n]) for n in names)
    assert not torch.equal(a[names[-1]], c[names[-1]])
    cold = model.sample_prior(3, temperature={names[0]: 0.0}, generator=torch.Generator().manual_seed(7))
    assert torch.equal(cold[names[0]], torch.zeros_like(cold[names[0]]))
    with pytest.raises(ConfigError, match="no latent level 'nope'"):
        model.sample_prior(1, temperature={"nope": 0.5})


def test_hierarchical_prior_sampling_is_ancestral():
    model = seeded(tiny("hierarchical")).eval()
    # p(z_l | z_<l) depends on the levels above: the same noise below a different top gives different z
    base = model.sample_prior(2, generator=torch.Generator().manual_seed(1))
    colder = model.sample_prior(2, temperature={TOP: 0.5}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(colder[TOP], 0.5 * base[TOP])
    assert not torch.allclose(colder["z2"], base["z2"])
    # temperature 0 everywhere: each level is its prior's mean given the means above
    zero = model.sample_prior(2, temperature=0.0, generator=torch.Generator().manual_seed(1))
    again = model.sample_prior(2, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(zero[n], again[n]) for n in zero)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_through_the_config(kind):
    model = seeded(tiny(kind), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
    again = build_model(ModelConfig.from_dict(model.config.to_dict())).eval()
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 16)
    noise = noise_for(model, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x, noise=noise).logits, model(x, noise=noise).logits, rtol=0, atol=0)
    assert again.config == model.config and again.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights(kind):
    a, b, c = seeded(tiny(kind), 5), seeded(tiny(kind), 5), seeded(tiny(kind), 6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("kind", KINDS)
def test_noise_for_every_level_makes_forward_deterministic(kind):
    model = seeded(tiny(kind))
    x = torch.rand(2, 3, 16, 16)
    noise = noise_for(model, 2, 16, 16, seed=1)
    torch.manual_seed(11)
    a = model(x, noise=noise)
    torch.manual_seed(12)
    b = model(x, noise=noise)
    c = model(x, noise=noise_for(model, 2, 16, 16, seed=2))
    assert all(torch.equal(a.latents[n], b.latents[n]) for n in a.latents) and torch.equal(a.logits, b.logits)
    assert not torch.equal(a.logits, c.logits)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(model(x, generator=g1).logits, model(x, generator=g2).logits)


def test_hierarchical_noise_must_cover_every_level():
    model = seeded(tiny("hierarchical"))
    noise = noise_for(model, 2, 16, 16)
    del noise["z2"]
    with pytest.raises(ValueError, match="lacks the level"):
        model(torch.rand(2, 3, 16, 16), noise=noise)


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_goes_through_alone(kind):
    """No batch statistics anywhere: what DDP's 2 x B = 1 x 2B equivalence needs."""
    model = seeded(tiny(kind))
    x = torch.rand(4, 3, 16, 16)
    noise = noise_for(model, 4, 16, 16)
    whole = model(x, noise=noise)
    halves = [model(x[i:i + 2], noise={n: v[i:i + 2] for n, v in noise.items()}) for i in (0, 2)]
    torch.testing.assert_close(whole.logits, torch.cat([h.logits for h in halves]), rtol=1e-5, atol=1e-5)
    for name in whole.kl_terms:
        torch.testing.assert_close(whole.kl_terms[name], torch.cat([h.kl_terms[name] for h in halves]),
                                   rtol=1e-5, atol=1e-6)


def test_hierarchical_mode_and_decode_agree_with_the_posterior_pass():
    model = seeded(tiny("hierarchical")).eval()
    x = torch.rand(2, 3, 16, 16)
    noise = noise_for(model, 2, 16, 16)
    with torch.no_grad():
        out = model(x, noise=noise)
        torch.testing.assert_close(model.decode(out.latents), out.logits)  # teacher-forced pass = posterior pass
        posterior = model.encode(x)
        means = posterior.mode()
        _, seen, _ = capture_distributions(model, x, {n: torch.zeros_like(v) for n, v in noise.items()})
        for name, (q, _, _) in seen.items():
            torch.testing.assert_close(means[name], q.mu)  # each level's mean given the means above
        torch.testing.assert_close(means[TOP], posterior.mu)
        torch.testing.assert_close(model.reconstruct(x), model.mean_image(model.decode(means)))
        assert torch.equal(model(x, sample=False).latents["z2"], means["z2"])


class _DtypeSpy:
    def __init__(self, modules):
        self.seen = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.seen[name] = (inputs[0].dtype, output.dtype)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _islands(model) -> dict:
    """The layers that touch pixels or set a distribution's parameters: float32 under autocast."""
    if model.kind == "hierarchical":
        cells = {f"{n}.{part}": getattr(c, part) for n, c in model.decoder.cells.items()
                 for part in ("prior", "posterior", "proj")}
        return {"first": model.encoder.stages[0][0], "top_head": model.encoder.top_head,
                "top_proj": model.decoder.top_proj, "out": model.decoder.out, **cells}
    return {"first": model.encoder.stages[0][0], "head": model.encoder.head,
            "decoder_head": model.decoder.head, "out": model.decoder.out}


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_forward_keeps_the_float32_islands(kind):
    model = seeded(tiny(kind))
    x = torch.rand(2, 3, 16, 16)
    spy = _DtypeSpy(_islands(model))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, noise=noise_for(model, 2, 16, 16))
    finally:
        spy.close()
    assert set(spy.seen) == set(_islands(model))
    assert all(dtypes == (torch.float32, torch.float32) for dtypes in spy.seen.values()), spy.seen
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert all(kl.dtype == torch.float32 and torch.isfinite(kl).all() for kl in out.kl_terms.values())
    elbo_loss(model, x, out).loss.backward()
    reference = model(x, noise=noise_for(model, 2, 16, 16)).logits
    assert (out.logits - reference).abs().max() < 0.1  # bf16 inside, but the same model


def test_old_configs_load_as_vector_and_new_fields_are_validated():
    old = {"image_size": 16, "channels": 3, "latent_dim": 4, "widths": [8, 16], "blocks": 1, "patch": 2,
           "likelihood": "gaussian", "decoder_scale": "optimal", "fixed_scale": 0.1, "min_log_scale": -6.0}
    config = ModelConfig.from_dict(old)
    assert config.kind == "vector" and build_model(config).kind == "vector"
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown ModelConfig keys: levels"):
        ModelConfig.from_dict({**old, "levels": 3})
    with pytest.raises(ConfigError, match="--model"):
        ModelConfig(kind="pixelcnn")
    with pytest.raises(ConfigError, match="--downsample 8 needs 3 --widths"):
        ModelConfig(kind="spatial", downsample=8, widths=(8, 16))
    with pytest.raises(ConfigError, match="--downsample must be"):
        ModelConfig(kind="spatial", downsample=3)
    with pytest.raises(ConfigError, match="--downsample 8 is finer"):
        ModelConfig(kind="hierarchical", downsample=8, widths=(8, 16), image_size=16)
    with pytest.raises(ConfigError, match="--latent-channels"):
        ModelConfig(kind="spatial", latent_channels=0)
    with pytest.raises(ConfigError, match="multiple of 4"):
        ModelConfig(kind="spatial", image_size=30, widths=(8, 16))


def test_family_default_widths():
    assert ModelConfig().widths == (16, 32, 64, 128)
    assert ModelConfig(kind="hierarchical").widths == (32, 64, 128, 256)
    assert len(ModelConfig(kind="spatial").widths) == 2 and len(ModelConfig(kind="spatial", downsample=8).widths) == 3
    assert ModelConfig(kind="spatial", widths=(8, 16)).widths == (8, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_the_reconstruction_gradient_reaches_every_posterior_through_the_sampled_latents(kind):
    model = seeded(tiny(kind))
    x = torch.rand(2, 3, 16, 16)
    elbo_loss(model, x, model(x, noise=noise_for(model, 2, 16, 16)), beta=0.0).loss.backward()  # no KL term
    heads = ([c.posterior for c in model.decoder.cells.values()] + [model.encoder.top_head]
             if kind == "hierarchical" else [model.encoder.head])
    for head in heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_keeps_the_family(kind, tmp_path):
    from vaetool.checkpoint import load_model, save_model

    f = 8 if kind == "spatial" else 4
    model = seeded(tiny(kind, image_size=32, widths=(8, 16, 16), downsample=f), seed=2).eval()
    path = save_model(tmp_path / f"{kind}.safetensors", model)
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.model.kind == kind
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
