"""`vaetool eval` for every model family: the IWAE bound over every level, per-level KL and active units, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributions as D
from typer.testing import CliRunner

from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.inference.evaluate import ALL_LEVELS, draw_noise, evaluate, iwae_bound
from vaetool.models.base import build_model
from conftest import tiny_families, tiny_model

FAMILIES = tiny_families()
_model = tiny_model


def _pixels(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_every_family_evaluates_with_each_levels_kl_and_the_same_numbers_at_any_batch_size(kind):
    model = _model(kind)
    pixels = _pixels(5)
    a = evaluate(model, pixels, iw_samples=3, batch_size=2, seed=4, device="cpu")
    b = evaluate(model, pixels, iw_samples=3, batch_size=5, seed=4, device="cpu")
    assert a.family == kind and a.images == 5
    assert list(a.levels) == list(model.latent_shapes(16, 16))
    assert a.kl == pytest.approx(sum(v["kl"] for v in a.levels.values()), rel=1e-9)
    assert a.neg_elbo == pytest.approx(a.recon + a.kl)
    for key in ("neg_elbo", "iwae_nll", "kl", "psnr", "ssim", "bits_per_dim"):
        assert math.isfinite(getattr(a, key))
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-5), key  # the seed fixes the noise
    assert a.active_units == b.active_units
    if model.vector_level is None:
        assert a.active_units_of == ALL_LEVELS and a.latent_dim == sum(v["units"] for v in a.levels.values())
    else:
        assert a.active_units_of == model.vector_level and a.latent_dim == 4


def test_spatial_kl_and_active_units_match_torch_distributions():
    model = _model("spatial")
    pixels = _pixels(6, seed=1)
    result = evaluate(model, pixels, iw_samples=2, batch_size=4, device="cpu")
    with torch.no_grad():
        q = model.encode(pixels.float() / 255).levels["z"]  # (B, C, h, w)
        kl = D.kl_divergence(D.Normal(q.mu, q.std), D.Normal(0.0, 1.0)).flatten(1).sum(1)
        active = int((q.mu.flatten(1).double().var(0, unbiased=False) > 0.01).sum())
    assert result.kl == pytest.approx(float(kl.mean()), rel=1e-5)
    assert result.levels["z"]["shape"] == [2, 4, 4] and result.levels["z"]["units"] == 32
    assert result.active_units == active


def test_noise_is_drawn_image_by_image():
    shapes = {"top": (3,), "z": (2, 2, 2)}
    whole = draw_noise(shapes, 4, 3, torch.Generator().manual_seed(0))
    assert whole["top"].shape == (4, 3, 3) and whole["z"].shape == (4, 3, 2, 2, 2)
    gen = torch.Generator().manual_seed(0)
    parts = [draw_noise(shapes, 4, n, gen) for n in (2, 1)]  # the same images in two batches
    for name in shapes:
        assert torch.equal(whole[name], torch.cat([p[name] for p in parts], dim=1))


def _sharp_hierarchy():
    """A tiny hierarchy whose decoder depends on z enough that q(z|x) is far from p(z|x): IWAE has work to do."""
    config = ModelConfig(kind="hierarchical", image_size=8, latent_dim=2, widths=(4, 8), latent_channels=1,
                         downsample=2, blocks=0, decoder_scale="fixed", fixed_scale=0.3)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(2.0)
    return model


def test_hierarchical_iwae_k_above_elbo_and_iwae_2k_above_iwae_k_on_average():
    model = _sharp_hierarchy()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).repeat(50, 1, 1, 1)  # 50 copies each
    means, errors = {}, {}
    for k in (1, 4, 8):
        values = iwae_bound(model, x, k, generator=torch.Generator().manual_seed(10 + k))  # (200,)
        means[k], errors[k] = float(values.mean()), float(values.std() / math.sqrt(len(values)))
    assert means[4] - means[1] > 4 * math.hypot(errors[1], errors[4])  # IWAE_K above the ELBO (K = 1)
    assert means[8] - means[4] > 3 * math.hypot(errors[4], errors[8])  # IWAE_2K above IWAE_K
    pixels = (x * 255).round().to(torch.uint8)
    one = evaluate(model, pixels, iw_samples=1, batch_size=100, device="cpu")
    eight = evaluate(model, pixels, iw_samples=8, batch_size=100, device="cpu")
    assert abs(one.neg_elbo - one.iwae_nll) < 4 * one.iwae_nll_sem + 1.0  # two estimates of the -ELBO agree
    assert eight.iwae_nll < one.neg_elbo - 4 * eight.iwae_nll_sem  # the reported -ELBO is the looser bound


def test_hierarchical_levels_add_up_and_each_is_reported():
    model = _model("hierarchical")
    result = evaluate(model, _pixels(4, seed=2), iw_samples=2, device="cpu")
    assert list(result.levels) == ["top", "z4", "z2"]
    assert result.levels["z2"]["shape"] == [2, 8, 8] and result.levels["top"]["shape"] == [4]
    assert all(v["kl"] >= 0 for v in result.levels.values())
    assert result.to_dict()["levels"]["z4"]["units"] == 32


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    return {kind: save_model(folder / f"{kind}.safetensors", _model(kind)) for kind in ("spatial", "hierarchical")}


def test_cli_table_shows_the_family_and_each_level(checkpoints, blob_folder):
    result = CliRunner().invoke(app, ["eval", str(checkpoints["hierarchical"]), str(blob_folder), "-k", "2",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.stderr
    assert "hierarchical" in result.stdout and "level z4" in result.stdout and "level top" in result.stdout
    assert "in level top" in result.stdout  # which level the active units count


@pytest.mark.parametrize("kind", ["spatial", "hierarchical"])
def test_installed_command_evaluates_the_family(kind, checkpoints, blob_folder):
    exe = Path(sys.executable).with_name("vaetool")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "vaetool"]
    done = subprocess.run(command + ["eval", str(checkpoints[kind]), str(blob_folder), "-k", "2", "--device", "cpu",
                                     "--json", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["family"] == kind and data["images"] == 12 and math.isfinite(data["iwae_nll"])
    assert list(data["levels"]) == list(_model(kind).latent_shapes(16, 16))


def test_prior_samples_are_seeded_for_every_family():
    from types import SimpleNamespace

    from vaetool.inference.sample_metric import draw_samples

    for kind in FAMILIES:
        checkpoint = SimpleNamespace(model=_model(kind))
        a, b = draw_samples(checkpoint, 5, seed=1), draw_samples(checkpoint, 5, seed=1)
        assert a.shape == (5, 3, 16, 16) and torch.equal(a, b) and 0 <= float(a.min()) <= float(a.max()) <= 1
        assert not torch.equal(a, draw_samples(checkpoint, 5, seed=2))


def test_cli_samples_reports_the_two_sample_test_with_its_setup(checkpoints, blob_folder):
    result = CliRunner().invoke(app, ["eval", str(checkpoints["spatial"]), str(blob_folder), "-k", "1", "--device",
                                      "cpu", "--samples", "8", "--train-data", str(blob_folder), "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    samples = json.loads(result.stdout)["samples"]
    assert samples["samples"] == 8 and samples["prior"] == "standard" and samples["reference"].startswith("the --train")
    test = samples["two_sample"]
    assert (test["real_train"], test["real_test"], test["generated_train"], test["generated_test"]) == (6, 6, 4, 4)
    assert 0.0 <= test["accuracy"] <= 1.0 and "seed 0" in samples["setup"]
    assert test["repeats"] == 3 and test["cross_fitted"] and len(test["accuracies"]) == 3  # the steadier default
    assert samples["memorisation"]["training"] == 12 and samples["memorisation"]["reference"] == 12
    once = CliRunner().invoke(app, ["eval", str(checkpoints["spatial"]), str(blob_folder), "-k", "1", "--device",
                                    "cpu", "--samples", "8", "--c2st-repeats", "1", "--json", "-q"])
    assert once.exit_code == 0, once.stderr
    single = json.loads(once.stdout)["samples"]
    assert single["two_sample"]["repeats"] == 1 and len(single["two_sample"]["accuracies"]) == 1
    from vaetool.cli.eval import _sample_rows  # the table's rows: the splits' range only where there are several

    shown = {name: dict(_sample_rows(s))["C2ST accuracy"] for name, s in (("default", samples), ("once", single))}
    assert "mean of 3 splits" in shown["default"] and "splits" not in shown["once"], shown
    table = CliRunner().invoke(app, ["eval", str(checkpoints["spatial"]), str(blob_folder), "-k", "1", "--device",
                                     "cpu", "--samples", "1", "-q"])
    assert table.exit_code == 1 and "at least 2 samples" in table.stderr


def test_cli_samples_are_drawn_at_the_temperature_and_prior_given(checkpoints, blob_folder):
    def run(*options):
        result = CliRunner().invoke(app, ["eval", str(checkpoints["hierarchical"]), str(blob_folder), "-k", "1",
                                          "--device", "cpu", "--samples", "8", "--c2st-repeats", "1", *options])
        assert result.exit_code == 0, result.stderr
        return result.stdout

    cold = json.loads(run("--temperature", "top=1,z2=0.3", "--prior", "standard", "--json", "-q"))["samples"]
    assert cold["temperature"] == {"top": 1.0, "z2": 0.3} and cold["prior"] == "standard"
    assert "temperature top=1,z2=0.3" in run("-q", "--temperature", "top=1,z2=0.3")
    warm = json.loads(run("--json", "-q"))["samples"]
    assert warm["temperature"] == 1.0
    assert warm["memorisation"] != cold["memorisation"]  # other samples: their distances to the images differ
