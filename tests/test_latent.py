"""Latent-space commands and the Python API: round trips, seeds, interpolation, the stdout contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vaetool
from conftest import make_blobs
from vaetool.cli.app import app
from vaetool.io.latents import load_latents, slerp, lerp

runner = CliRunner()


@pytest.fixture
def data(tmp_path):
    make_blobs(tmp_path / "in" / "sub", count=3, seed=1)
    make_blobs(tmp_path / "in", count=4, seed=2)
    return tmp_path / "in"


def invoke(*args, stdin=None):
    return runner.invoke(app, [str(a) for a in args], input=stdin)


def test_encode_then_decode_equals_reconstruct(ckpt, data, tmp_path):
    z = tmp_path / "z.safetensors"
    result = invoke("encode", ckpt, data, "-o", z, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(z)
    table = load_latents(z)
    assert table.values.shape == (7, 4)
    assert table.names == ["img_000.png", "img_001.png", "img_002.png", "img_003.png", "sub/img_000.png",
                           "sub/img_001.png", "sub/img_002.png"]
    meta_paths = json.loads(table.metadata["paths"])
    assert meta_paths[-1] == str(data / "sub" / "img_002.png")
    assert table.metadata["checkpoint"] == vaetool.load(ckpt).checkpoint.identity
    assert invoke("decode", ckpt, z, "-o", tmp_path / "dec", "-q").exit_code == 0
    assert invoke("reconstruct", ckpt, data, "-o", tmp_path / "rec", "-q").exit_code == 0
    for name in table.names:
        a = (tmp_path / "dec" / name).read_bytes()
        b = (tmp_path / "rec" / name).read_bytes()
        assert a == b, name


def test_decode_refuses_wrong_width_and_nan(ckpt, tmp_path):
    from safetensors.torch import save_file

    save_file({"z": torch.zeros(3, 5)}, str(tmp_path / "wide.safetensors"))
    result = invoke("decode", ckpt, tmp_path / "wide.safetensors", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "latent_dim is 4" in result.stderr
    save_file({"z": torch.full((2, 4), float("nan"))}, str(tmp_path / "nan.safetensors"))
    result = invoke("decode", ckpt, tmp_path / "nan.safetensors", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "NaN" in result.stderr
    import numpy as np

    np.save(tmp_path / "ok.npy", np.zeros((2, 4), dtype=np.float32))
    result = invoke("decode", ckpt, tmp_path / "ok.npy", "-o", tmp_path / "o", "-q")
    assert result.exit_code == 0 and result.stdout.split() == [str(tmp_path / "o" / "000000.png"),
                                                                str(tmp_path / "o" / "000001.png")]


def test_sample_count_seed_and_no_overwrite(ckpt, tmp_path):
    a = invoke("sample", ckpt, "-n", 6, "-o", tmp_path / "a", "--seed", 3, "--grid", tmp_path / "g.png", "-q")
    assert a.exit_code == 0 and a.stdout.splitlines()[-1] == str(tmp_path / "g.png")  # the grid is a result too
    assert len(a.stdout.splitlines()) == 7 and (tmp_path / "g.png").is_file()
    b = invoke("sample", ckpt, "-n", 6, "-o", tmp_path / "b", "--seed", 3, "-q")
    c = invoke("sample", ckpt, "-n", 6, "-o", tmp_path / "c", "--seed", 4, "-q", "-t", "2")
    assert b.exit_code == 0 and c.exit_code == 0, (b.output, c.output)
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert any((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in os.listdir(tmp_path / "a"))
    again = invoke("sample", ckpt, "-n", 6, "-o", tmp_path / "a", "-q")
    assert again.exit_code == 1 and again.stdout == "" and "already exists (and 5 more)" in again.stderr
    assert invoke("sample", ckpt, "-n", 6, "-o", tmp_path / "a", "--skip-existing", "-q").exit_code == 0
    assert invoke("sample", ckpt, "-n", 0, "-o", tmp_path / "z").exit_code == 2
    assert invoke("sample", ckpt, "-t", 0, "-o", tmp_path / "z").exit_code == 2


def test_interpolation_endpoints_are_the_means(ckpt, data, tmp_path):
    model = vaetool.load(ckpt)
    za, zb = model.encode(data / "img_000.png").mu[0], model.encode(data / "img_001.png").mu[0]
    t = torch.linspace(0, 1, 5)
    for path in (slerp(za, zb, t), lerp(za, zb, t)):
        torch.testing.assert_close(path[0], za, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(path[-1], zb, atol=1e-5, rtol=1e-5)
    mid = slerp(za, zb, torch.tensor([0.5]))[0]
    assert abs(mid.norm() - (za.norm() + zb.norm()) / 2) < abs(lerp(za, zb, torch.tensor([0.5]))[0].norm() - (za.norm() + zb.norm()) / 2) + 1e-6
    result = invoke("interpolate", ckpt, data / "img_000.png", data / "img_001.png", data / "img_002.png",
                    "-o", tmp_path / "f", "--steps", 4, "--gif", tmp_path / "a.gif", "--grid", tmp_path / "s.png", "-q")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # 4 + 3 frames (shared endpoint once), then the grid and the GIF
    assert len(lines) == 9 and lines[-2:] == [str(tmp_path / "s.png"), str(tmp_path / "a.gif")]
    frames = model.load_images(tmp_path / "f")
    first = model.decode(za[None])
    torch.testing.assert_close(frames[0], (first[0] * 255).round() / 255, atol=1 / 255, rtol=0)
    invoke("encode", ckpt, data, "-o", tmp_path / "z.safetensors", "-q")
    rows = invoke("interpolate", ckpt, f"{tmp_path / 'z.safetensors'}:0", f"{tmp_path / 'z.safetensors'}:1",
                  "-o", tmp_path / "f2", "--method", "lerp", "-q")
    assert rows.exit_code == 0 and len(rows.stdout.splitlines()) == 8
    assert invoke("interpolate", ckpt, data / "img_000.png", "-o", tmp_path / "x").exit_code == 2


def test_bad_inputs_exit_3_and_good_ones_written(ckpt, data, tmp_path):
    (data / "broken.png").write_bytes(b"not a png")
    result = invoke("reconstruct", ckpt, data, "-o", tmp_path / "rec", "-q")
    assert result.exit_code == 3
    assert "broken.png" in result.stderr
    assert len(result.stdout.splitlines()) == 7
    assert invoke("reconstruct", ckpt, data, "-o", data / "out").exit_code == 1  # inside the input folder


def test_traverse_and_jsonl_and_stdin(ckpt, data, tmp_path):
    result = invoke("traverse", ckpt, "-o", tmp_path / "t.png", "--data", data, "--rows", 3, "--steps", 5, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert len(info["dims"]) == 3 and (tmp_path / "t.png").is_file()
    from PIL import Image
    width, height = Image.open(tmp_path / "t.png").size
    assert (width, height) == (5 * 18 + 2, 3 * 18 + 2)
    paths = "\n".join(str(p) for p in sorted(data.glob("*.png"))) + "\n"
    lines = invoke("encode", ckpt, "-", "-o", "-", stdin=paths).stdout.splitlines()
    assert [json.loads(line)["path"] for line in lines] == sorted(str(p) for p in data.glob("*.png"))


def test_python_api(ckpt, data):
    model = vaetool.load(ckpt, device="cpu")
    x = model.load_images(data)
    assert x.shape == (7, 3, 16, 16)
    posterior = model.encode(x)
    assert posterior.mu.shape == (7, 4)
    assert model.decode(posterior.mu).shape == x.shape
    torch.testing.assert_close(model.reconstruct(x), model.decode(posterior.mu))
    torch.testing.assert_close(model.sample(3, seed=1), model.sample(3, seed=1))
    assert model.interpolate(x[0], x[1], steps=5).shape == (5, 3, 16, 16)


def test_stdout_holds_only_paths_in_a_subprocess(ckpt, data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    exe = str(Path(sys.executable).with_name("vaetool"))
    result = subprocess.run([exe, "sample", str(ckpt), "-n", "4", "-o", str(tmp_path / "s")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(Path(line).is_file() for line in lines)
    gray = subprocess.run([exe, "reconstruct", str(ckpt), str(data), "-o", str(tmp_path / "r"), "--ext", "jpg"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert gray.returncode == 0 and all(line.endswith(".jpg") for line in gray.stdout.splitlines())
    assert "reconstruct: done 7, skipped 0, failed 0 (of 7)" in gray.stderr
