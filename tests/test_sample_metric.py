"""The sample metric: real against real scores near chance, blurred images are caught, copies are found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faces import draw_face, face_attributes
from vaetool.errors import DataError
from vaetool.inference.sample_metric import classifier_two_sample_test, memorisation, nearest_distances

SIZE = 32
OPTIONS = {"steps": 100, "batch_size": 32, "widths": (8, 16, 32)}


def faces(seed: int, count: int) -> torch.Tensor:
    """(count, 3, 32, 32) cartoon faces in [0, 1] from examples/faces.py."""
    arrays = [np.asarray(draw_face(face_attributes(seed, i), SIZE)) for i in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """A separable Gaussian blur, 5 taps, per channel."""
    taps = torch.exp(-torch.arange(-2, 3).float().pow(2) / (2 * sigma**2))
    taps = taps / taps.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), taps.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), taps.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return faces(0, 300)


@pytest.fixture(scope="module")
def other() -> torch.Tensor:
    return faces(1, 300)


def test_real_against_real_scores_near_chance(real, other):
    result = classifier_two_sample_test(real, other, seed=0, **OPTIONS)
    assert abs(result.accuracy - 0.5) <= 0.1
    assert result.p_value > 0.001
    assert (result.real_train, result.real_test, result.generated_train, result.generated_test) == (150, 150, 150, 150)


def test_real_against_blurred_real_is_told_apart(real, other):
    result = classifier_two_sample_test(real, blur(other), seed=0, **OPTIONS)
    assert result.accuracy >= 0.8
    assert result.p_value < 1e-6
    assert result.log_loss < 0.6931  # better than a coin's log 2


def test_cross_fitted_repeats_average_splits_and_one_plain_split_is_the_former_test(real, other):
    options = OPTIONS | {"steps": 30}
    single = classifier_two_sample_test(real[:96], blur(other[:96], 0.6), seed=2, repeats=1, cross_fit=False, **options)
    assert single.accuracies == (single.accuracy,) and not single.cross_fitted and single.repeats == 1
    both_ways = classifier_two_sample_test(real[:96], blur(other[:96], 0.6), seed=2, repeats=1, **options)
    assert both_ways.cross_fitted and both_ways.accuracy != single.accuracy
    repeated = classifier_two_sample_test(real[:96], blur(other[:96], 0.6), seed=2, repeats=3, **options)
    assert repeated.accuracies[0] == both_ways.accuracy  # the first repeat is the seed's own split
    assert len(set(repeated.accuracies)) > 1 and repeated.accuracy == pytest.approx(sum(repeated.accuracies) / 3)
    assert repeated.spread == (min(repeated.accuracies), max(repeated.accuracies))
    assert "mean of 3 splits, each cross-fitted" in repeated.summary()
    with pytest.raises(DataError, match="at least one repeat"):
        classifier_two_sample_test(real[:8], real[:8], repeats=0)


def test_the_repeated_test_moves_less_with_the_seed_than_one_split(real, other):
    """The point of the repeats: a score that depends on the images, not on one split and one initialisation."""
    real_part, fake_part = real[:80], blur(other[:80], 0.7)  # a small, hard case, as a few hundred samples are
    options = OPTIONS | {"steps": 40}
    single = [classifier_two_sample_test(real_part, fake_part, seed=s, repeats=1, cross_fit=False, **options).accuracy
              for s in range(6)]
    repeated = [classifier_two_sample_test(real_part, fake_part, seed=s, **options).accuracy for s in range(6)]
    assert np.std(repeated) < np.std(single)


def test_the_result_is_seeded_and_states_its_setup(real, other):
    options = OPTIONS | {"steps": 20}
    a = classifier_two_sample_test(real[:64], blur(other[:64]), seed=3, **options)
    b = classifier_two_sample_test(real[:64], blur(other[:64]), seed=3, **options)
    assert a == b
    state = torch.get_rng_state()
    c = classifier_two_sample_test(real[:64], blur(other[:64]), seed=4, **options)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is left alone
    assert c.log_loss != a.log_loss
    assert a.to_dict()["steps"] == 20 and a.widths == (8, 16, 32) and a.image_size == (SIZE, SIZE)
    assert a.parameters > 0 and "20 steps of 32, seed 3" in a.summary() and a.repeats == 3 and a.cross_fitted


def test_large_images_are_reduced_and_mismatched_ones_refused(real):
    big = F.interpolate(real[:8], scale_factor=4)  # 128 px: area-averaged to 64 before the classifier
    assert classifier_two_sample_test(big, big, steps=1, batch_size=4).image_size == (64, 64)
    with pytest.raises(DataError, match="one size"):
        classifier_two_sample_test(real[:8], real[:8, :, :16], steps=1)
    with pytest.raises(DataError, match="N >= 2"):
        classifier_two_sample_test(real[:1], real[:8], steps=1)


def test_copies_of_training_images_are_at_distance_zero(real, other):
    copies = real[[5, 17, 299]]
    distance, index = nearest_distances(copies, real, chunk=2)
    assert index.tolist() == [5, 17, 299]
    assert distance.tolist() == [0.0, 0.0, 0.0]
    shifted = (real[:4] + 0.1).clamp(0, 1)
    assert (nearest_distances(shifted, real)[0] > 0).all()


def test_memorisation_compares_samples_with_held_out_real_images(real, other):
    copied = memorisation(real[:50], real[:200], other[:100])
    assert copied.mean == 0.0 and copied.min == 0.0 and copied.near_fraction == 1.0
    assert copied.reference_min > 0.0 and (copied.samples, copied.training, copied.reference) == (50, 200, 100)
    fresh = memorisation(other[100:200], real[:200], other[:100])
    assert fresh.mean == pytest.approx(fresh.reference_mean, rel=0.2)  # new faces sit as far as real ones do
    assert fresh.near_fraction < 0.2
    assert memorisation(real[:10], real[:200]).near_fraction is None


# ------------------------------------------------------------------- wired into `vaetool eval --samples`


class _Bank(torch.nn.Module):
    """A stand-in model whose prior samples are the next images of a fixed bank: the metric's wiring, tested alone."""

    def __init__(self, images: torch.Tensor, reconstruct=lambda x: x) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.images, self.taken = images, 0
        self.reconstruct = reconstruct  # what the model's own reconstruct gives: the images, or a blur of them
        self.config = SimpleNamespace(image_size=images.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where the model's weights live: the CPU

    def latent_shapes(self, height, width):
        return {"rows": ()}

    def sample_prior(self, count, *, temperature=1.0, generator=None, size=None, given=None, noise=None):
        rows = torch.arange(self.taken, self.taken + count) % len(self.images)
        self.taken += count
        return {"rows": rows}

    def decode(self, latents):
        return self.images[latents["rows"].long()]

    def mean_image(self, logits):
        return logits


def _report(real, bank, reconstruct=lambda x: x, **options):
    from types import SimpleNamespace

    from vaetool.inference.sample_metric import sample_report

    checkpoint = SimpleNamespace(model=_Bank(bank, reconstruct), config=None)
    return sample_report(checkpoint, (real * 255).round().to(torch.uint8), len(bank), seed=0,
                         test_options=OPTIONS | options)


def test_eval_sample_report_real_against_real_near_chance_and_blurred_well_above(real, other):
    same = _report(real[:200], other[:200])
    assert abs(same.two_sample.accuracy - 0.5) <= 0.12
    blurred = _report(real[:200], blur(other[:200]))
    assert blurred.two_sample.accuracy >= 0.75 and blurred.two_sample.log_loss < same.two_sample.log_loss
    data = blurred.to_dict()
    assert data["samples"] == 200 and data["prior"] == "standard" and data["seed"] == 0
    assert "100 steps of 32, seed 0" in data["setup"] and data["two_sample"]["real_test"] == 100
    assert data["notes"] and "half of the evaluated images" in data["reference"]


def test_eval_sample_report_scores_the_reconstructions_of_half_the_images_against_the_other_half(real, other):
    exact = _report(real[:200], other[:200])  # reconstructions that are the images: chance
    assert abs(exact.reconstructions.accuracy - 0.5) <= 0.12
    assert exact.reconstructions.real_train == 50 and exact.reconstructions.generated_train == 50
    blurry = _report(real[:200], other[:200], reconstruct=blur)  # a decoder that blurs: told apart
    assert blurry.reconstructions.accuracy >= 0.75
    assert blurry.to_dict()["reconstructions"]["accuracy"] == blurry.reconstructions.accuracy
    assert _report(real[:6], other[:6], steps=2).reconstructions is None  # too few images to split twice


def test_eval_sample_report_finds_copies_of_the_images(real):
    copies = _report(real[:64], real[:64], steps=2)  # a model that returns the images themselves
    assert copies.memorisation.min == 0.0 and copies.memorisation.near_fraction >= 0.4
    assert copies.memorisation.training == 32 and copies.memorisation.reference == 32


def test_it_trains_when_called_in_inference_mode_on_tensors_made_there(real, other):
    options = OPTIONS | {"steps": 20}
    expected = classifier_two_sample_test(real[:64], blur(other[:64]), seed=3, **options)
    with torch.inference_mode():
        inside = classifier_two_sample_test(real[:64].clone(), blur(other[:64]), seed=3, **options)
    assert inside == expected
