"""`vaetool report` and `vaetool info` for spatial and hierarchical runs: the family and each level's shape shown."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig, TrainConfig
from vaetool.models.base import build_model
from vaetool.training.report import describe_latents, latent_levels, report_figure
from vaetool.training.trainer import train

SPATIAL = ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=3, downsample=4)
HIERARCHICAL = ModelConfig(kind="hierarchical", image_size=16, latent_dim=4, widths=(8, 16), latent_channels=2,
                           downsample=2)


@pytest.mark.parametrize("config", [ModelConfig(), SPATIAL, HIERARCHICAL], ids=lambda c: c.kind)
def test_latent_levels_are_the_familys_own_shapes(config):
    torch.manual_seed(0)
    want = build_model(config).latent_shapes(config.image_size, config.image_size)
    assert latent_levels(config.to_dict()) == want
    assert describe_latents(config.to_dict()).startswith(f"{config.kind} model, latents ")
    assert latent_levels({"kind": "pixelcnn"}) is None and describe_latents(None) == ""


def test_report_and_info_of_a_hierarchical_run(blob_folder, tmp_path):
    run = tmp_path / "run"
    train([blob_folder], run, model_config=HIERARCHICAL, device="cpu", cache_dir=None, report=False,
          train_config=TrainConfig(steps=2, batch_size=4, val_fraction=0.25, log_every=1))
    runner = CliRunner()
    done = runner.invoke(app, ["report", str(run)])
    assert done.exit_code == 0, done.stderr
    page = (run / "report.html").read_text()
    assert "hierarchical model, latents top 4, z4 2x4x4, z2 2x8x8" in page
    assert "kl_top" in page  # each level's KL in the metrics table
    assert "hierarchical model" in report_figure(run)._suptitle.get_text()
    info = runner.invoke(app, ["info", str(run), "--json"])
    assert info.exit_code == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["family"] == "hierarchical" and data["levels"] == {"top": [4], "z4": [2, 4, 4], "z2": [2, 8, 8]}


def test_info_table_of_a_spatial_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = save_model(tmp_path / "s.safetensors", build_model(SPATIAL))
    text = CliRunner().invoke(app, ["info", str(path)])
    assert text.exit_code == 0, text.stderr
    rows = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert rows["family"] == "spatial" and rows["latents"] == "z 3x4x4"
