"""Latent maps: 2-D means shown as they are, thumbnails at their points, PCA, grid picking, CSV labels, correlation."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vaetool.io.decode import load_image
from vaetool.io.find import find_images
from vaetool.inference.attributes import attribute_table, correlate_attributes, match_rows, read_labels, read_table
from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.errors import ConfigError, DataError, OutputError
from vaetool.inference.latentmap import (grid_pick, latent_map, map_bounds, pca, project, render_map, thumbnail_canvas)
from vaetool.models.vector import VAE

COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 220, 20), (200, 30, 200), (20, 210, 210),
           (250, 140, 0), (120, 60, 20)]


def _solid_images(folder: Path, size: int = 16) -> list[Path]:
    """One flat colour per image: its thumbnail's colour says which image it is."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(COLOURS):
        pixels = np.tile(np.array(colour, np.uint8), (size, size, 1))
        path = folder / f"c{i}.png"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VAE]:
    torch.manual_seed(3)
    model = VAE(ModelConfig(image_size=16, channels=3, latent_dim=2, widths=(8, 16))).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(path, model)
    return path, model


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("colours") / "data"
    _solid_images(folder)
    return folder


def _means(model: VAE, paths: list[Path]) -> torch.Tensor:
    x = torch.stack([load_image(p, image_size=16, channels=3) for p in paths]).float() / 255.0
    with torch.no_grad():
        return model.encode(x).mu.double()


def _nearest_colour(pixel: np.ndarray) -> int:
    return int(np.argmin([np.abs(pixel - np.array(c)).sum() for c in COLOURS]))


def _pixel(path: Path, column: float, row: float) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))[int(round(row)), int(round(column))].astype(int)


def test_two_d_model_places_each_thumbnail_at_its_posterior_mean(model_2d, colour_folder, tmp_path):
    checkpoint, model = model_2d
    out = tmp_path / "map.png"
    result = latent_map(checkpoint, [colour_folder], out, cells=40, device="cpu")
    paths = sorted(colour_folder.glob("*.png"))
    assert [f.path for f in result.means.found] == paths
    assert result.projection.method == "dims" and result.projection.labels == ("z[0]", "z[1]")
    assert torch.allclose(result.projection.points, _means(model, paths), atol=1e-5)  # the means themselves
    assert sorted(result.placed) == list(range(len(paths)))  # few images: every one gets a thumbnail
    for index, (column, row) in zip(result.placed, result.pixels):
        pixel = _pixel(out, column, row)
        assert _nearest_colour(pixel) == index and np.abs(pixel - np.array(COLOURS[index])).max() <= 40


def test_thumbnails_land_on_the_axes_coordinates_of_their_points(tmp_path):
    points = torch.tensor([[-2.0, -1.0], [3.0, 2.0], [0.0, 0.5], [-1.5, 2.5]], dtype=torch.float64)
    thumbs = [np.tile(np.array(c, np.uint8), (8, 8, 1)) for c in COLOURS[:4]]
    bounds = map_bounds(points)
    proj = project(points.float(), method="dims")
    canvas = thumbnail_canvas(points, thumbs, bounds, cells=10, thumb_px=8)
    fig, ax = render_map(proj, bounds, canvas=canvas, size=600)
    out = tmp_path / "m.png"
    fig.savefig(out, dpi=100)
    xy = ax.transData.transform(points.numpy())
    for colour, (x, y) in zip(COLOURS, xy):
        assert np.abs(_pixel(out, x, fig.bbox.height - y) - np.array(colour)).max() <= 12
    # and nothing coloured where no point is: the midpoint of the first two is background
    mx, my = xy[:2].mean(0)
    assert np.abs(_pixel(out, mx, fig.bbox.height - my) - 255).max() <= 40


def test_grid_pick_keeps_one_image_per_occupied_cell_nearest_its_centre():
    points = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bounds = map_bounds(points)
    cells = 10
    picked = grid_pick(points, bounds, cells=cells)
    side = max(bounds[1] - bounds[0], bounds[3] - bounds[2]) / cells
    cell = torch.floor((points - torch.tensor([bounds[0], bounds[2]])) / side).long()
    keys = (cell[:, 1] * 1000 + cell[:, 0]).tolist()
    occupied = set(keys)
    assert len(picked) == len(occupied) <= cells * cells < len(points)
    assert len({keys[i] for i in picked}) == len(picked)
    centres = (cell.double() + 0.5) * side + torch.tensor([bounds[0], bounds[2]])
    dist = (points - centres).norm(dim=1)
    for i in picked[::7]:
        same = [j for j, k in enumerate(keys) if k == keys[i]]
        assert dist[i] <= dist[same].min() + 1e-12


def test_grid_pick_skips_points_outside_a_fixed_extent():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.5, -0.5]], dtype=torch.float64)
    assert 1 not in grid_pick(points, map_bounds(points, extent=2.0), cells=4)


def test_pca_finds_the_planted_axes_and_their_variance_share():
    g = torch.Generator().manual_seed(1)
    u = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    u /= u.norm()
    v = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    a = 3.0 * torch.randn(4000, 1, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    x = 5.0 + a * u + b * v + 0.01 * torch.randn(4000, 5, generator=g, dtype=torch.float64)
    components, mean, explained = pca(x)
    assert abs(float(components[0] @ u)) > 0.999 and abs(float(components[1] @ v)) > 0.999
    assert torch.allclose(mean, torch.full((5,), 5.0, dtype=torch.float64) + (a * u + b * v).mean(0), atol=0.02)
    assert abs(float(explained[0]) - 0.9) < 0.02 and abs(float(explained[1]) - 0.1) < 0.02
    proj = project(x.float(), method="auto")
    assert proj.method == "pca" and proj.labels[0].startswith("PC1 (90%")
    assert abs(float(torch.corrcoef(torch.stack([proj.points[:, 0], a[:, 0]]))[0, 1])) > 0.999


def test_dims_projection_defaults_to_the_most_varying_dimensions_and_checks_choices():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(2)) * torch.tensor([1, 0.1, 5, 0.1, 3, 0.1])
    assert project(x, method="dims").dims == (2, 4)
    assert project(x, method="auto", dims=[1, 3]).dims == (1, 3)
    with pytest.raises(ConfigError, match="does not exist"):
        project(x, method="dims", dims=[0, 6])
    with pytest.raises(ConfigError, match="unknown projection"):
        project(x, method="tsne")


def test_correlation_finds_the_planted_factor():
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(500, 8, generator=g)
    smile = 2.0 * mu[:, 5] + 0.3 * torch.randn(500, generator=g)
    table = {"noise": torch.randn(500, generator=g, dtype=torch.float64), "smile": smile.double(),
             "constant": torch.ones(500, dtype=torch.float64)}
    table["smile"][:20] = float("nan")  # missing values are left out, not treated as numbers
    ranking = correlate_attributes(-mu, table)  # the sign of r follows the direction
    best = ranking[0]
    assert (best.attribute, best.dimension) == ("smile", 5) and best.r < -0.95 and best.images == 480
    assert all(abs(c.r) < 0.2 for c in ranking if c.attribute == "noise")
    assert not any(c.attribute == "constant" for c in ranking)
    assert [abs(c.r) for c in ranking] == sorted((abs(c.r) for c in ranking), reverse=True)


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_csv_rows_match_images_by_relative_path_absolute_path_or_name(tmp_path, colour_folder):
    found = find_images([colour_folder])
    table = _write_csv(tmp_path / "meta" / "attrs.csv", [
        ["file", "score", "kind"],
        [os.path.relpath(colour_folder / "c0.png", tmp_path / "meta"), "1.5", "a"],  # relative to the CSV
        [str((colour_folder / "c1.png").resolve()), "2", "b"],
        ["c2.png", "", "a"], ["c3.png", "x", "b"], ["unrelated.png", "9", "c"],
        ["x/c5.png", "1", "a"], ["y/c5.png", "2", "b"]])  # two rows share a name: c5 is ambiguous
    header, rows = read_table(table)
    matched = match_rows(table, header, rows, found)
    assert [m["kind"] if m else None for m in matched[:6]] == ["a", "b", "a", "b", None, None]
    assert attribute_table(table, found) == {}  # "x" is not a number: the column is not numeric
    name, labels = read_labels(f"{table}:kind", found)
    assert name == "kind" and labels[:5] == ["a", "b", "a", "b", None]
    _write_csv(table, [["path", "score"], ["c0.png", "1.5"], ["c1.png", "2"], ["c2.png", ""]])
    assert read_labels(f"{table}:score", found)[1][:4] == [1.5, 2.0, None, None]
    assert torch.equal(attribute_table(table, found)["score"][:2], torch.tensor([1.5, 2.0], dtype=torch.float64))
    with pytest.raises(DataError, match="no column 'smile'"):
        read_labels(f"{table}:smile", found)
    _write_csv(table, [["path", "score"], ["other.png", "1"]])
    with pytest.raises(DataError, match="no row of"):
        read_labels(f"{table}:score", found)


def test_latent_map_refuses_to_overwrite_and_unknown_formats(model_2d, colour_folder, tmp_path):
    out = tmp_path / "map.png"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="--force"):
        latent_map(model_2d[0], [colour_folder], out, device="cpu")
    assert out.read_bytes() == b"keep"
    with pytest.raises(OutputError, match=".png"):
        latent_map(model_2d[0], [colour_folder], tmp_path / "map.gif", device="cpu")


def test_cli_latent_map_colour_by_and_correlate(model_2d, colour_folder, tmp_path):
    runner = CliRunner()
    labels = _write_csv(tmp_path / "labels.csv", [["path", "group", "value"]] +
                        [[f"c{i}.png", i % 3, float(i)] for i in range(len(COLOURS))])
    out = tmp_path / "scatter.png"
    result = runner.invoke(app, ["latent-map", str(model_2d[0]), str(colour_folder), "-o", str(out), "--color-by",
                                 f"{labels}:group", "--device", "cpu", "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["kind"] == "map" and summary["images"] == len(COLOURS) and summary["thumbnails"] == 0
    assert Image.open(out).size[0] == 1000
    again = runner.invoke(app, ["latent-map", str(model_2d[0]), str(colour_folder), "-o", str(out), "-q"])
    assert again.exit_code == 1 and "--force" in again.stderr and again.stdout == ""
    corr = runner.invoke(app, ["correlate", str(model_2d[0]), str(colour_folder), "-a", str(labels), "--top", "2",
                               "--device", "cpu", "-q"])
    assert corr.exit_code == 0, corr.output
    lines = [line.split("\t") for line in corr.stdout.splitlines()]
    assert len(lines) == 4 and {a for a, _, _ in lines} == {"group", "value"}
    assert all(d in ("0", "1") and -1.0 <= float(r) <= 1.0 for _, d, r in lines)
    missing = runner.invoke(app, ["correlate", str(model_2d[0]), str(colour_folder), "-a", str(labels),
                                  "--attribute", "smile", "--device", "cpu", "-q"])
    assert missing.exit_code == 1 and "smile" in missing.stderr


def test_installed_command_maps_a_folder_and_counts_unreadable_files(model_2d, colour_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colour_folder, data)
    (data / "broken.png").write_bytes(b"not a png")
    exe = Path(sys.executable).with_name("vaetool")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "vaetool"]
    out = tmp_path / "map.png"
    done = subprocess.run(command + ["latent-map", str(model_2d[0]), str(data), "-o", str(out), "--device", "cpu",
                                     "--cells", "5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == str(out) and "broken.png" in done.stderr
    with Image.open(out) as image:
        image.verify()
