"""Where the commands write: one input file to one output file, encode's -o forms, and --resume's data and options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_ARGS, make_blobs
from vaetool.cli.app import app
from vaetool.io.latents import load_latents


def invoke(*args, stdin: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin, env={"COLUMNS": "250"})


@pytest.fixture
def page(tmp_path) -> Path:
    make_blobs(tmp_path / "in", count=1, size=23)
    return tmp_path / "in" / "img_000.png"


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".vaetool-")]


@pytest.mark.parametrize("command", ["denoise", "reconstruct"])
def test_one_input_file_and_an_image_name_write_that_file(ckpt, page, tmp_path, command):
    target = tmp_path / "out" / "page_clean.png"
    first = invoke(command, ckpt, page, "-o", target, "--device", "cpu", "-q")
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [str(target)]
    assert target.is_file() and not (tmp_path / "out" / "page_clean.png" / "img_000.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["page_clean.png"]  # no scratch folder left
    if command == "denoise":
        assert Image.open(target).size == Image.open(page).size  # denoise keeps the input's size
    again = invoke(command, ckpt, page, "-o", target, "--device", "cpu", "-q")
    assert again.exit_code == 1 and "already exists" in again.stderr and again.stdout == ""
    kept = invoke(command, ckpt, page, "-o", target, "--device", "cpu", "-q", "--skip-existing")
    assert kept.exit_code == 0 and kept.stdout == ""
    target.write_bytes(b"")  # --force replaces it
    forced = invoke(command, ckpt, page, "-o", target, "--device", "cpu", "-q", "--force", "--json")
    assert forced.exit_code == 0 and target.stat().st_size > 0
    assert json.loads(forced.stdout)["output"] == str(target)
    jpeg = invoke(command, ckpt, page, "-o", tmp_path / "out" / "page.jpg", "--device", "cpu", "-q")
    assert jpeg.exit_code == 0 and Image.open(tmp_path / "out" / "page.jpg").format == "JPEG"
    assert not _leftovers(tmp_path / "out")


def test_one_file_refusals(ckpt, page, tmp_path):
    before = page.read_bytes()
    over = invoke("denoise", ckpt, page, "-o", page, "--device", "cpu", "--force")
    assert over.exit_code == 1 and "input file itself" in over.stderr and page.read_bytes() == before
    ext = invoke("denoise", ckpt, page, "-o", tmp_path / "x.png", "--ext", "jpg")
    assert ext.exit_code == 2 and "drop --ext" in ext.stderr
    folder = invoke("denoise", ckpt, page, "-o", tmp_path / "folder", "--device", "cpu", "-q")  # no extension
    assert folder.exit_code == 0 and (tmp_path / "folder" / "img_000.png").is_file()
    assert not _leftovers(tmp_path)


def test_encode_writes_npy_and_a_folder_gets_latents_safetensors(ckpt, tmp_path):
    make_blobs(tmp_path / "in", count=3)
    npy = invoke("encode", ckpt, tmp_path / "in", "-o", tmp_path / "z.npy", "-q")
    assert npy.exit_code == 0, npy.output
    assert npy.stdout.strip() == str(tmp_path / "z.npy")
    means = np.load(tmp_path / "z.npy", allow_pickle=False)
    assert means.shape == (3, 4) and means.dtype == np.float32
    folder = invoke("encode", ckpt, tmp_path / "in", "-o", f"{tmp_path / 'zdir'}/", "-q")
    assert folder.exit_code == 0, folder.output
    table = load_latents(tmp_path / "zdir" / "latents.safetensors")
    assert folder.stdout.strip() == str(tmp_path / "zdir" / "latents.safetensors")
    np.testing.assert_allclose(table.values.numpy(), means, rtol=1e-6)
    existing = invoke("encode", ckpt, tmp_path / "in", "-o", tmp_path / "zdir", "-q", "--force")
    assert existing.exit_code == 0 and existing.stdout.strip() == str(tmp_path / "zdir" / "latents.safetensors")
    again = invoke("encode", ckpt, tmp_path / "in", "-o", tmp_path / "z.npy", "-q")
    assert again.exit_code == 1 and "--force" in again.stderr
    decoded = invoke("decode", ckpt, tmp_path / "z.npy", "-o", tmp_path / "dec", "-q")  # numpy's file reads back
    assert decoded.exit_code == 0 and len(decoded.stdout.splitlines()) == 3


def test_resume_takes_the_recorded_data_and_refuses_changed_settings(tmp_path):
    make_blobs(tmp_path / "data", count=6)
    run = tmp_path / "run"
    first = invoke("train", tmp_path / "data", "-o", run, "--steps", 2, *TINY_ARGS)
    assert first.exit_code == 0, first.output
    assert json.loads((run / "run.json").read_text())["data"] == [str(tmp_path / "data")]
    (run / "run.json").unlink()  # a run made before run.json existed
    no_record = invoke("train", "-o", run, "--resume", "--steps", 3, *TINY_ARGS)
    assert no_record.exit_code == 2 and "run.json" in no_record.stderr and "give DATA" in no_record.stderr
    (run / "run.json").write_text(json.dumps({"data": [str(tmp_path / "data")]}))
    changed = invoke("train", "-o", run, "--resume", "--steps", 3, *TINY_ARGS, "--latent-dim", 8, "--lr", 0.1)
    assert changed.exit_code == 2
    message = " ".join(changed.stderr.replace("│", " ").split())
    assert "--resume uses the run's own config; drop --latent-dim (the run has 4, not 8)" in message
    assert "--lr (the run has 0.002, not 0.1)" in message
    resumed = invoke("train", "-o", run, "--resume", "--steps", 3, *TINY_ARGS, "--json")  # the same settings again
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["step"] == 3
