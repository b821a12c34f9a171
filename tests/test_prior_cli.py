"""`vaetool fit-prior` and the prior in `vaetool info` / `train --no-fit-prior`, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_ARGS, make_blobs, save_tiny_checkpoint
from vaetool.checkpoint import load_model
from vaetool.cli.app import app

runner = CliRunner()
VAETOOL = str(Path(sys.executable).with_name("vaetool"))


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, count=30)
    return save_tiny_checkpoint(tmp_path / "m.safetensors"), data


def test_fit_prior_writes_into_the_checkpoint_and_info_shows_it(setup):
    path, data = setup
    before = load_model(path)
    assert before.prior is None
    plain = runner.invoke(app, ["info", str(path)])
    assert "prior" in plain.stdout and "none" in plain.stdout.split("prior", 1)[1]
    result = runner.invoke(app, ["fit-prior", str(path), str(data), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(path)]
    assert "note: fitted prior on latent z (4,)" in result.stderr and "N(0, I)" in result.stderr
    after = load_model(path)
    assert after.prior is not None and after.identity == before.identity
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    shown = runner.invoke(app, ["info", str(path)])
    line = next(row for row in shown.stdout.splitlines() if row.startswith("prior"))
    assert f"fitted, {after.prior.components} component(s) over latent z (4,)" in line
    summary = json.loads(runner.invoke(app, ["info", str(path), "--json"]).stdout)
    assert summary["prior"]["components"] == after.prior.components and summary["prior"]["level"] == "z"


def test_output_components_json_and_one_line_errors(setup, tmp_path):
    path, data = setup
    new = tmp_path / "new.safetensors"
    result = runner.invoke(app, ["fit-prior", str(path), str(data), "-k", "2", "-o", str(new), "--json", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["output"] == str(new) and record["status"] == "written" and record["prior"]["components"] <= 2 and list(record["prior"]["scores"]) == ["2"]
    assert load_model(path).prior is None and load_model(new).prior is not None  # the input is left as it was
    again = runner.invoke(app, ["fit-prior", str(path), str(data), "-o", str(new)])
    assert again.exit_code == 1 and again.stderr.startswith("error:") and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert runner.invoke(app, ["fit-prior", str(path), str(data), "-o", str(new), "-f", "-q"]).exit_code == 0
    many = runner.invoke(app, ["fit-prior", str(path), str(data), "-k", "40"])
    assert many.exit_code == 1 and "fewer components" in many.stderr
    assert runner.invoke(app, ["fit-prior", str(path), str(data), "-k", "zero"]).exit_code == 2
    not_ckpt = runner.invoke(app, ["fit-prior", str(data / "img_000.png"), str(data)])
    assert not_ckpt.exit_code == 1 and "PNG image" in not_ckpt.stderr


def test_a_bad_image_is_named_left_out_and_exits_3(setup):
    path, data = setup
    (data / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = runner.invoke(app, ["fit-prior", str(path), str(data), "-q"])
    assert result.exit_code == 3, result.output
    assert "zz_broken.png" in result.stderr and result.stdout.splitlines() == [str(path)]
    assert load_model(path).prior is not None


def test_train_no_fit_prior_leaves_the_run_without_one(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, count=12)
    result = runner.invoke(app, ["train", str(data), "-o", str(tmp_path / "run"), "--steps", "2", "--no-fit-prior",
                                 "--no-report", *TINY_ARGS])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "run").prior is None and "fitted prior" not in result.stderr


def test_train_fits_a_prior_to_a_small_latent_map_and_leaves_a_large_one_to_fit_prior(tmp_path, monkeypatch):
    from vaetool.training import fit_prior

    data = tmp_path / "data"
    make_blobs(data, count=24)
    spatial = ["train", str(data), "-o", str(tmp_path / "small"), "--steps", "2", "--no-report", "--no-disk-cache",
               "--image-size", "16", "--model", "spatial", "--widths", "8,16", "--latent-channels", "2",
               "--batch-size", "4", "--device", "cpu"]
    result = runner.invoke(app, spatial)
    assert result.exit_code == 0, result.output
    prior = load_model(tmp_path / "small").prior
    assert prior is not None and prior.level == "z" and prior.shape == (2, 4, 4)  # the map of a 16 px image
    assert prior.kind == "second-stage" and "second-stage prior on latent z" in result.stderr
    monkeypatch.setattr(fit_prior, "MAX_MAP_NUMBERS", 31)  # the same 32-number map, now "large"
    spatial[3] = str(tmp_path / "large")
    result = runner.invoke(app, spatial)
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "large").prior is None
    assert "the latent map has 32 numbers per image (above 31); `vaetool fit-prior` fits one" in result.stderr


def test_the_installed_command_fits_a_prior_for_a_run_folder(setup, tmp_path):
    path, data = setup
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = shutil.copy(path, run_dir / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    fitted = subprocess.run([VAETOOL, "fit-prior", str(run_dir), str(data), "--seed", "1", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert fitted.returncode == 0, fitted.stderr
    assert fitted.stdout.splitlines() == [str(checkpoint)] and "fitted prior" in fitted.stderr
    assert load_model(checkpoint).prior is not None
    assert load_model(checkpoint).identity == load_model(path).identity
