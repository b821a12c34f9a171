"""The fitted prior: EM recovers a known mixture, selection by held-out likelihood, sampling, storage."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from vaetool.errors import CheckpointError, ConfigError
from vaetool.models.prior import FittedPrior, fit_mixture, prior_level, prior_levels, select_mixture

MEANS = torch.tensor([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]])
COVS = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 2.0]], [[1.5, -0.6], [-0.6, 0.7]]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


def known_mixture() -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(WEIGHTS), MultivariateNormal(MEANS, COVS))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    torch.manual_seed(0)
    return known_mixture().sample((3000,))  # (3000, 2)


def _match(fitted_means: torch.Tensor) -> list[int]:
    """For each true component, the fitted one nearest to its mean."""
    return torch.cdist(MEANS, fitted_means.float()).argmin(1).tolist()


def test_em_recovers_a_known_mixture(data):
    prior = fit_mixture(data, components=3, generator=torch.Generator().manual_seed(0))
    assert prior.components == 3
    order = _match(prior.means)
    assert sorted(order) == [0, 1, 2]  # a permutation
    covs = prior.scale_tril @ prior.scale_tril.transpose(1, 2)
    assert torch.allclose(prior.means[order], MEANS, atol=0.15)
    assert torch.allclose(prior.weights[order], WEIGHTS, atol=0.03)
    assert torch.allclose(covs[order], COVS, atol=0.2)


def test_selection_by_held_out_likelihood_picks_three(data):
    prior = select_mixture(data, candidates=range(1, 7), generator=torch.Generator().manual_seed(1))
    assert prior.components == 3
    assert set(prior.scores) == set(range(1, 7))
    assert prior.held_out == max(prior.scores.values())
    assert prior.scores[3] > prior.scores[2] + 0.1  # two components clearly underfit


def test_log_prob_matches_torch_distributions(data):
    prior = fit_mixture(data, components=3, generator=torch.Generator().manual_seed(0))
    reference = MixtureSameFamily(Categorical(prior.weights.double()),
                                  MultivariateNormal(prior.means.double(), scale_tril=prior.scale_tril.double()))
    z = data[:200].double()
    assert torch.allclose(prior.log_prob(z), reference.log_prob(z), atol=1e-9)


def test_sampling_is_deterministic_for_a_seed_and_follows_the_fit(data):
    prior = fit_mixture(data, components=3, generator=torch.Generator().manual_seed(0))
    a = prior.sample(4000, generator=torch.Generator().manual_seed(5))
    b = prior.sample(4000, generator=torch.Generator().manual_seed(5))
    c = prior.sample(4000, generator=torch.Generator().manual_seed(6))
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.mean(0), known_mixture().mean, atol=0.15)
    one = fit_mixture(data, components=1)
    warm, cold = (one.sample(100, generator=torch.Generator().manual_seed(5), temperature=t) for t in (1.0, 0.5))
    # The same noise at half the spread around the mean: the covariance times T^2.
    assert torch.allclose(cold - one.means[0], 0.5 * (warm - one.means[0]), atol=1e-5)


def test_tensors_round_trip_exactly_through_safetensors(tmp_path, data):
    prior = select_mixture(data, candidates=(1, 3), generator=torch.Generator().manual_seed(0))
    tensors = prior.to_tensors()
    assert all(name.startswith("prior.z.") for name in tensors)
    save_file(tensors | {"decoder.weight": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    loaded = FittedPrior.from_tensors(load_file(str(tmp_path / "m.safetensors")))
    assert loaded.level == "z" and loaded.shape == (2,) and loaded.scores == prior.scores
    assert loaded.held_out == prior.held_out
    for name in ("weights", "means", "scale_tril"):
        assert torch.equal(getattr(loaded, name), getattr(prior, name))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(loaded.sample(10, generator=g), prior.sample(10, generator=torch.Generator().manual_seed(3)))


def test_from_tensors_names_what_is_missing():
    with pytest.raises(CheckpointError, match="fit-prior"):
        FittedPrior.from_tensors({"decoder.weight": torch.zeros(2)})
    prior = fit_mixture(torch.randn(50, 3), components=1)
    tensors = prior.to_tensors()
    del tensors["prior.z.means"]
    with pytest.raises(CheckpointError, match="prior.z.means"):
        FittedPrior.from_tensors(tensors)


def test_a_large_latent_map_is_fitted_in_a_principal_subspace():
    """(8, 8, 9) = 576 numbers: above max_dims, so PCA to 16 dims plus an isotropic rest."""
    torch.manual_seed(0)
    factors = torch.randn(300, 4, dtype=torch.float64)
    mixing = torch.randn(4, 576, dtype=torch.float64)
    z = (factors @ mixing + 0.05 * torch.randn(300, 576, dtype=torch.float64)).float().reshape(300, 8, 8, 9)
    prior = fit_mixture(z, components=2, generator=torch.Generator().manual_seed(0), reduced_dims=16)
    assert prior.basis.shape == (576, 16) and prior.means.shape == (2, 16)
    assert prior.residual_std == pytest.approx(0.05, rel=0.2)
    samples = prior.sample(300, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (300, 8, 8, 9)
    # The samples keep the data's low-rank structure: 4 directions carry nearly all their variance.
    spectrum = torch.linalg.svdvals(samples.reshape(300, -1) - samples.reshape(300, -1).mean(0)).pow(2)
    assert spectrum[:4].sum() / spectrum.sum() > 0.95
    # A proper density: held-out data scores far above the same data shuffled across dimensions.
    fresh = (torch.randn(100, 4, dtype=torch.float64) @ mixing).float().reshape(100, 8, 8, 9)
    shuffled = fresh.reshape(100, -1)[:, torch.randperm(576)].reshape(100, 8, 8, 9)
    assert prior.log_prob(fresh).mean() > prior.log_prob(shuffled).mean() + 1000
    round_trip = FittedPrior.from_tensors(prior.to_tensors())
    assert torch.equal(round_trip.log_prob(fresh), prior.log_prob(fresh))
    with pytest.raises(ConfigError, match="size the prior was fitted"):
        prior.log_prob(torch.zeros(2, 8, 8, 8))


def test_collapsed_components_are_dropped():
    """A broad cloud and one far outlier: no component may shrink onto the outlier alone."""
    torch.manual_seed(0)
    z = torch.cat([torch.randn(200, 2), torch.full((1, 2), 30.0)])
    prior = fit_mixture(z, components=4, generator=torch.Generator().manual_seed(0), min_count=2.0)
    assert prior.components < 4 or bool((prior.weights * 201 >= 2.0).all())
    assert torch.isfinite(prior.log_prob(z)).all()


def test_errors_name_what_to_do():
    with pytest.raises(ConfigError, match="more images"):
        fit_mixture(torch.randn(3, 2), components=4)
    with pytest.raises(ConfigError, match="NaN"):
        fit_mixture(torch.full((10, 2), float("nan")), components=1)
    with pytest.raises(ConfigError, match="held_out"):
        select_mixture(torch.randn(10, 2), held_out=1.5)


def test_prior_level_and_stored_levels():
    assert prior_level(["z"]) == "z"
    assert prior_level(["top", "mid", "bottom"]) == "top"
    with pytest.raises(ConfigError):
        prior_level(["a", "b"])
    prior = fit_mixture(torch.randn(20, 2), components=1, level="top")
    assert prior_levels(prior.to_tensors() | {"encoder.w": torch.zeros(1)}) == ["top"]


def test_the_isotropic_rest_stays_outside_the_principal_subspace():
    """Mixture std 0.1 along e1, residual std 1 elsewhere: the rest must not leak into e1."""
    prior = FittedPrior(level="z", shape=(3,), weights=torch.ones(1), means=torch.zeros(1, 1),
                        scale_tril=torch.full((1, 1, 1), 0.1), center=torch.zeros(3),
                        basis=torch.tensor([[1.0], [0.0], [0.0]]), residual_std=1.0)
    std = prior.sample(20000, generator=torch.Generator().manual_seed(0)).std(0)
    assert torch.allclose(std, torch.tensor([0.1, 1.0, 1.0]), rtol=0.03)
    z = torch.tensor([[0.3, -1.0, 2.0]])
    expected = (torch.distributions.Normal(0.0, 0.1).log_prob(z[:, 0])
                + torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 1:]).sum(1))
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-5)


def test_selection_with_patience_stops_once_larger_mixtures_stop_helping(data):
    full = select_mixture(data, candidates=range(1, 9), generator=torch.Generator().manual_seed(1))
    quick = select_mixture(data, candidates=range(1, 9), generator=torch.Generator().manual_seed(1), patience=2)
    assert quick.components == full.components == 3
    assert set(quick.scores) == {1, 2, 3, 4, 5}  # 4 and 5 did not beat 3: the sweep stopped there
    assert quick.scores == {k: full.scores[k] for k in quick.scores}
