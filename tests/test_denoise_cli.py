"""`vaetool denoise` as a user runs it: mirrored trees, resuming, refusals, failures, stdout vs stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import make_blobs
from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.models.vector import VAE

VAETOOL = str(Path(sys.executable).with_name("vaetool"))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path / "tiny.safetensors", VAE(ModelConfig(image_size=16, widths=(8, 16), latent_dim=4)))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Nested folders with unicode and space names, mixed sizes, gray and colour."""
    root = tmp_path / "in put"
    make_blobs(root, count=2, size=16)
    make_blobs(root / "été" / "deep er", count=2, size=23, seed=1, mode="L")
    make_blobs(root / "b", count=1, size=40, seed=2)
    (root / "b" / "img_000.png").rename(root / "b" / "café au lait.png")
    return root


def _denoise(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["denoise", *args, "--device", "cpu", "--workers", "2"], input=input)


def _relative(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_mirrors_the_tree_and_prints_written_paths(ckpt, tree, tmp_path):
    out = tmp_path / "out"
    result = _denoise(str(ckpt), str(tree), "-o", str(out), "--batch-size", "3")
    assert result.exit_code == 0, result.stderr
    assert _relative(out) == _relative(tree)
    assert sorted(result.stdout.splitlines()) == sorted(str(out / rel) for rel in _relative(tree))
    assert "done 5, skipped 0, failed 0" in result.stderr and "plain VAE reconstruction" in result.stderr
    for rel in _relative(tree):
        before, after = Image.open(tree / rel), Image.open(out / rel)
        assert (after.mode, after.size) == (before.mode, before.size)


def test_ext_suffix_and_json(ckpt, tree, tmp_path):
    result = _denoise(str(ckpt), str(tree / "b"), "-o", str(tmp_path / "o"), "--ext", "jpg", "--suffix", "_dn",
                      "--json", "-q")
    assert result.exit_code == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["output"] == str(tmp_path / "o" / "café au lait_dn.jpg")
    assert Image.open(line["output"]).format == "JPEG" and result.stderr == ""


def test_skip_existing_resumes_and_existing_outputs_are_refused(ckpt, tree, tmp_path):
    out = tmp_path / "out"
    assert _denoise(str(ckpt), str(tree), "-o", str(out), "-q").exit_code == 0
    kept = out / "img_000.png"
    os.utime(kept, (1, 1))
    (out / "été" / "deep er" / "img_001.png").unlink()
    refused = _denoise(str(ckpt), str(tree), "-o", str(out))
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "already exists" in refused.stderr and "--skip-existing" in refused.stderr
    resumed = _denoise(str(ckpt), str(tree), "-o", str(out), "--skip-existing")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.splitlines() == [str(out / "été" / "deep er" / "img_001.png")]
    assert "skipped 4" in resumed.stderr and kept.stat().st_mtime == 1
    forced = _denoise(str(ckpt), str(tree), "-o", str(out), "--force", "-q")
    assert forced.exit_code == 0 and len(forced.stdout.splitlines()) == 5 and kept.stat().st_mtime > 1


def test_refuses_to_write_into_the_input_folder(ckpt, tree):
    before = {p: p.read_bytes() for p in tree.rglob("*.png")}
    inside = _denoise(str(ckpt), str(tree), "-o", str(tree / "denoised"))
    assert inside.exit_code == 1 and "inside input folder" in inside.stderr and not (tree / "denoised").exists()
    same = _denoise(str(ckpt), str(tree), "-o", str(tree))
    assert same.exit_code == 1 and "--force" in same.stderr
    # --force allows the folder, but an input file is still never overwritten
    overwrite = _denoise(str(ckpt), str(tree), "-o", str(tree), "--force")
    assert overwrite.exit_code == 1 and "would overwrite the input" in overwrite.stderr
    assert {p: p.read_bytes() for p in tree.rglob("*.png")} == before
    beside = _denoise(str(ckpt), str(tree / "b"), "-o", str(tree / "b"), "--force", "--suffix", "_dn", "-q")
    assert beside.exit_code == 0 and (tree / "b" / "café au lait_dn.png").is_file()
    assert {p: p.read_bytes() for p in before} == before


def test_a_broken_file_fails_alone_with_exit_3(ckpt, tree, tmp_path):
    (tree / "été" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tree / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    result = _denoise(str(ckpt), str(tree), "-o", str(out))
    assert result.exit_code == 3
    assert len(result.stdout.splitlines()) == 5 and all(Path(p).is_file() for p in result.stdout.splitlines())
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and any("broken.png" in f for f in failed) and any("empty.jpg" in f for f in failed)
    assert "failed 2" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "été" / "broken.png").exists()


def test_paths_from_stdin_and_usage_errors(ckpt, tree, tmp_path):
    paths = [str(p) for p in sorted(tree.glob("*.png"))]
    result = _denoise(str(ckpt), "-", "-o", str(tmp_path / "o"), "-q", input="\n".join(paths) + "\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "o" / Path(p).name) for p in paths]
    assert _denoise(str(ckpt), str(tree), "-o", str(tmp_path / "x"), "--tile", "huge").exit_code == 2
    assert _denoise(str(ckpt), str(tree), "-o", str(tmp_path / "x"), "--strength", "2").exit_code == 2
    bad_ext = _denoise(str(ckpt), str(tree), "-o", str(tmp_path / "x"), "--ext", "docx")
    assert bad_ext.exit_code == 2 and "--ext" in bad_ext.stderr and not (tmp_path / "x").exists()  # at parse time
    missing = _denoise(str(tmp_path / "nope.safetensors"), str(tree), "-o", str(tmp_path / "x"))
    assert missing.exit_code == 1 and missing.stderr.startswith("error:") and len(missing.stderr.splitlines()) == 1


def test_tile_modes_and_strength_from_the_command_line(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "in" / "x.png")
    original = np.asarray(Image.open(tmp_path / "in" / "x.png"))
    for mode in ("auto", "off", "24"):
        result = _denoise(str(ckpt), str(tmp_path / "in"), "-o", str(tmp_path / mode), "--tile", mode, "-q")
        assert result.exit_code == 0, result.stderr
        assert np.asarray(Image.open(tmp_path / mode / "x.png")).shape == original.shape
    none = _denoise(str(ckpt), str(tmp_path / "in"), "-o", str(tmp_path / "s0"), "--strength", "0", "-q")
    assert none.exit_code == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "s0" / "x.png")), original)


def test_help_explains_plain_reconstruction():
    result = CliRunner().invoke(app, ["denoise", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "plain VAE reconstruction" in text and "--skip-existing" in text and "--strength" in text


@pytest.mark.slow
def test_installed_command_end_to_end(ckpt, tree, tmp_path):
    (tree / "bad.png").write_bytes(b"nope")
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    result = subprocess.run([VAETOOL, "denoise", str(ckpt), str(tree), "-o", str(tmp_path / "out"), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 3, result.stderr
    assert len(result.stdout.splitlines()) == 5 and "bad.png" not in result.stdout
    assert "bad.png" in result.stderr and "done 5, skipped 0, failed 1 (of 6)" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spatial", "hierarchical"])
def test_installed_command_end_to_end_for_any_size_families(kind, tree, tmp_path):
    from vaetool.models.base import build_model

    torch.manual_seed(0)
    config = ModelConfig(kind=kind, image_size=16, widths=(8, 16), latent_dim=4, latent_channels=2,
                         downsample=4 if kind == "spatial" else 2)
    path = save_model(tmp_path / f"{kind}.safetensors", build_model(config))
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    result = subprocess.run([VAETOOL, "denoise", str(path), str(tree), "-o", str(tmp_path / "out"), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5 and "done 5, skipped 0, failed 0 (of 5)" in result.stderr
    for relative in _relative(tree):
        assert Image.open(tmp_path / "out" / relative).size == Image.open(tree / relative).size  # 23 px, 40 px
