"""`latent-map` and `correlate` for every family: the vector level, or a spatial map's channels pooled over the map."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_blobs
from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.io.decode import load_image
from vaetool.inference.latentmap import features, latent_map, map_features
from vaetool.models.base import build_model

FAMILIES = {
    "vector": ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)),
    "spatial": ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=3, downsample=4),
    "hierarchical": ModelConfig(kind="hierarchical", image_size=16, latent_dim=4, widths=(8, 16), latent_channels=2,
                                downsample=2),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("blobs") / "data"
    make_blobs(data, count=10, seed=3)
    return data


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    out = {}
    for kind, config in FAMILIES.items():
        torch.manual_seed(1)
        model = build_model(config).eval()
        out[kind] = (save_model(tmp_path_factory.mktemp(kind) / "model.safetensors", model), model)
    return out


def _expected(model, folder: Path) -> torch.Tensor:
    """What the map should show, computed here from the model's own posterior."""
    paths = sorted(folder.glob("*.png"))
    x = torch.stack([load_image(p, image_size=16, channels=3) for p in paths]).float() / 255.0
    with torch.no_grad():
        posterior = model.encode(x)
        if model.kind == "spatial":
            return posterior.levels["z"].mu.mean(dim=(2, 3))  # (N, C): each channel averaged over the map
        return posterior.mu  # the vector level: z, or the hierarchy's top


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_features_are_the_vector_level_or_pooled_channel_means(kind, models, folder):
    model = models[kind][1]
    want = _expected(model, folder)
    paths = sorted(folder.glob("*.png"))
    x = torch.stack([load_image(p, image_size=16, channels=3) for p in paths]).float() / 255.0
    with torch.no_grad():
        got = features(model, model.encode(x))
    torch.testing.assert_close(got, want)
    symbol, what = map_features(model)
    assert symbol == {"vector": "z", "spatial": "z", "hierarchical": "top"}[kind]
    assert ("averaged over the map" in what) == (kind == "spatial")
    assert want.shape[1] == (3 if kind == "spatial" else 4)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_latent_map_places_every_family(kind, models, folder, tmp_path):
    result = latent_map(models[kind][0], [folder], tmp_path / "map.png", method="dims", dims=[0, 1], cells=4,
                        device="cpu")
    want = _expected(models[kind][1], folder)
    torch.testing.assert_close(result.projection.points, want[:, :2].double(), rtol=1e-4, atol=1e-5)  # channels_last rounding
    assert result.projection.labels[0].startswith({"hierarchical": "top"}.get(kind, "z") + "[")
    with Image.open(tmp_path / "map.png") as image:
        image.verify()


@pytest.mark.parametrize("kind", ["spatial", "hierarchical"])
def test_cli_correlate_finds_the_planted_dimension_and_says_what_it_is(kind, models, folder, tmp_path):
    want = _expected(models[kind][1], folder)
    table = tmp_path / "attributes.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "planted"])
        for path, value in zip(sorted(folder.glob("*.png")), want[:, 1].tolist()):
            writer.writerow([path.name, 3.0 * value - 1.0])  # an affine copy of dimension 1: r = 1
    runner = CliRunner()
    done = runner.invoke(app, ["correlate", str(models[kind][0]), str(folder), "-a", str(table), "--device", "cpu",
                               "--json"])
    assert done.exit_code == 0, done.stderr
    row = json.loads(done.stdout.splitlines()[0])
    assert row["dimension"] == 1 and row["r"] == pytest.approx(1.0, abs=1e-4)
    level = "'top'" if kind == "hierarchical" else "averaged over the map"
    assert level in row["latent"] and level in done.stderr  # the output says which numbers these are
    drawn = runner.invoke(app, ["latent-map", str(models[kind][0]), str(folder), "-o", str(tmp_path / "m.png"),
                                "--device", "cpu", "--json", "-q"])
    assert drawn.exit_code == 0, drawn.stderr
    assert level in json.loads(drawn.stdout)["latent"]
