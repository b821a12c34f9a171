"""The fitted prior in checkpoints: stored beside the weights, fitted at the end of training, refitted later."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vaetool.checkpoint import load_model, read_metadata, save_model, save_prior
from vaetool.config import ModelConfig, TrainConfig
from vaetool.errors import CheckpointError, ConfigError, DataError, OutputError
from vaetool.events import Note
from vaetool.models.base import build_model
from vaetool.models.prior import fit_mixture
from vaetool.training.fit_prior import fit_prior, model_prior_level, posterior_means
from vaetool.training.trainer import train

LEGACY = Path(__file__).parent / "data" / "legacy_vector.safetensors"
TINY = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))
HIERARCHICAL = ModelConfig(kind="hierarchical", image_size=16, latent_dim=4, widths=(8, 16), latent_channels=2,
                           downsample=2)


def _model(config=TINY):
    torch.manual_seed(0)
    return build_model(config).eval()


def _prior(level="z", dims=4, components=2, seed=0):
    z = torch.randn(200, dims, generator=torch.Generator().manual_seed(seed))
    z[:100] += 3.0  # two clusters
    return fit_mixture(z, components=components, generator=torch.Generator().manual_seed(seed), level=level)


def _tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def test_a_prior_round_trips_beside_unchanged_weights(tmp_path):
    model, prior = _model(), _prior()
    prior.held_out, prior.scores = -3.5, {1: -4.0, 2: -3.5}
    plain = save_model(tmp_path / "plain.safetensors", model, training={"step": 3})
    with_prior = save_model(tmp_path / "prior.safetensors", model, training={"step": 3}, prior=prior)
    loaded, bare = load_model(with_prior), load_model(plain)
    assert bare.prior is None and loaded.prior is not None
    assert loaded.identity == bare.identity  # the identity is the weights'
    assert {k: v for k, v in _tensors(with_prior).items() if not k.startswith("prior.")}.keys() == _tensors(plain).keys()
    got = loaded.prior
    assert (got.level, got.shape, got.components, got.held_out, got.scores) == ("z", (4,), 2, -3.5, {1: -4.0, 2: -3.5})
    for name in ("weights", "means", "scale_tril"):
        assert torch.equal(getattr(got, name), getattr(prior, name)), name
    draw = lambda p: p.sample(16, generator=torch.Generator().manual_seed(7))  # noqa: E731
    assert torch.equal(draw(got), draw(prior))
    # only a file that carries a prior has the newer format, so an older vaetool reads every other one
    assert read_metadata(with_prior)["format_version"] == "2" and read_metadata(plain)["format_version"] == "1"


def test_an_old_checkpoint_loads_without_a_prior_and_takes_one(tmp_path):
    old = load_model(LEGACY)
    assert old.prior is None
    copy = tmp_path / "legacy.safetensors"
    copy.write_bytes(LEGACY.read_bytes())
    save_prior(copy, _prior(dims=old.config.latent_dim))
    again = load_model(copy)
    assert again.prior.components == 2 and again.identity == old.identity
    assert again.training == old.training and again.metadata["created"] == old.metadata["created"]
    x = torch.rand(2, old.config.channels, old.config.image_size, old.config.image_size)
    torch.testing.assert_close(again.model.reconstruct(x), old.model.reconstruct(x))


def test_save_prior_replaces_removes_and_never_overwrites_another_file(tmp_path):
    path = save_model(tmp_path / "m.safetensors", _model(), prior=_prior(components=1))
    save_prior(path, _prior(components=2))
    assert load_model(path).prior.components == 2
    assert sum(k.endswith(".weights") for k in _tensors(path) if k.startswith("prior.")) == 1  # replaced, not added
    other = save_model(tmp_path / "other.safetensors", _model())
    with pytest.raises(OutputError, match="already exists"):
        save_prior(path, None, output=other)
    save_prior(path, None, output=tmp_path / "new.safetensors")
    assert load_model(tmp_path / "new.safetensors").prior is None and load_model(path).prior is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "new.safetensors", "other.safetensors"]


def test_a_damaged_or_foreign_prior_is_a_one_line_error(tmp_path):
    path = save_model(tmp_path / "m.safetensors", _model(), prior=_prior())
    tensors, metadata = load_file(str(path)), read_metadata(path)
    save_file({k: v for k, v in tensors.items() if k != "prior.z.means"}, str(tmp_path / "cut.safetensors"), metadata)
    with pytest.raises(CheckpointError, match=r"cut.safetensors.*prior.*fit-prior"):
        load_model(tmp_path / "cut.safetensors")
    wrong = save_model(tmp_path / "wrong.safetensors", _model(), prior=_prior(dims=6))  # latent_dim is 4
    with pytest.raises(CheckpointError, match=r"latents z \(6,\).*fit-prior") as caught:
        load_model(wrong)
    assert "\n" not in str(caught.value)


def test_the_hierarchical_prior_is_for_the_top_level(tmp_path):
    model = _model(HIERARCHICAL)
    assert model_prior_level(model) == "top"
    x = torch.rand(6, 3, 16, 16)
    means = posterior_means(model, [(x * 255).to(torch.uint8)], level="top", device="cpu")
    assert means.shape == (6, 4)
    path = save_model(tmp_path / "h.safetensors", model, prior=_prior(level="top"))
    assert load_model(path).prior.level == "top"


def test_posterior_means_are_the_encoder_means_and_flips_add_the_mirrored_images():
    model = _model()
    pixels = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    means = posterior_means(model, [pixels[:3], pixels[3:]], level="z", device="cpu")
    with torch.no_grad():
        expected = model.encode(pixels.float() / 255).mode()["z"]
    torch.testing.assert_close(means, expected)
    both = posterior_means(model, [pixels], level="z", device="cpu", flip=True)
    assert both.shape == (10, 4)
    with torch.no_grad():
        torch.testing.assert_close(both[5:], model.encode((pixels.float() / 255).flip(-1)).mode()["z"])


def test_fit_prior_chooses_by_held_out_likelihood_is_seeded_and_refuses_too_few():
    generator = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(150, 3, generator=generator) * 0.3 + c for c in (-2.0, 0.0, 2.0)])  # three clusters
    fit = fit_prior(z, level="z", seed=1)
    assert fit.prior.components >= 2  # more than one: the clusters show
    assert fit.prior.held_out > fit.standard  # it beats N(0, I) on its own latents' held-out part
    again = fit_prior(z, level="z", seed=1)
    assert torch.equal(again.prior.means, fit.prior.means) and again.prior.scores == fit.prior.scores
    fixed = fit_prior(z, level="z", components=3, seed=1)
    assert fixed.prior.components == 3 and set(fixed.prior.scores) == {3}
    assert "3 component(s)" in fixed.message() and "N(0, I)" in fixed.message()
    with pytest.raises(ConfigError, match="at most"):
        fit_prior(z[:20], level="z", components=9)
    with pytest.raises(DataError, match="at least 10"):
        fit_prior(z[:5], level="z")


def _train(data, out, *, fit, callback=None):
    config = TrainConfig(steps=4, batch_size=2, val_fraction=0.1, seed=3, log_every=2)
    return train([data], out, model_config=TINY, train_config=config, device="cpu", cache_dir=None, report=False,
                 fit_prior=fit, callback=callback)


def test_training_stores_a_prior_in_both_checkpoints_and_leaves_the_weights(blob_folder, tmp_path):
    notes = []
    result = _train(blob_folder, tmp_path / "fit", fit=True,
                    callback=lambda e: notes.append(e.message) if isinstance(e, Note) else None)
    _train(blob_folder, tmp_path / "plain", fit=False)
    for name in ("model.safetensors", "last.safetensors"):
        fitted, plain = load_model(tmp_path / "fit" / name), load_model(tmp_path / "plain" / name)
        assert plain.prior is None and fitted.prior is not None and fitted.prior.level == "z"
        assert fitted.identity == plain.identity  # the same training, and the fit did not touch the weights
    assert result.prior["components"] == fitted.prior.components and result.to_dict()["prior"] == result.prior
    assert len(notes) == 1 and "11 posterior means" in notes[0]  # both files share one fit (same weights)
    # the run can go on: resuming reads state.safetensors, and the prior is refitted at its end
    again = train([blob_folder], tmp_path / "fit", model_config=TINY, device="cpu", cache_dir=None, report=False,
                  train_config=TrainConfig(steps=6), resume=True)
    assert again.step == 6 and load_model(tmp_path / "fit").prior is not None
