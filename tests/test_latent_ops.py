"""The latent-space engine (vaetool.inference.latent_ops, vaetool.io.latents) and the Python API, without the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaetool
from conftest import make_blobs
from vaetool.events import Failed, Progress, Written
from vaetool.inference import latent_ops as ops
from vaetool.inference.load import load_for_inference
from vaetool.io.decode import load_image
from vaetool.checkpoint import load_model, save_model
from vaetool.config import ModelConfig
from vaetool.errors import DataError, OutputError
from vaetool.io.find import find_images
from vaetool.io.latents import lerp, load_latents, slerp, split_row_reference
from vaetool.models.vector import VAE

TINY = dict(image_size=16, widths=(8, 16), latent_dim=4)


def _checkpoint(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    path = folder / "model.safetensors"
    save_model(path, VAE(ModelConfig(**(TINY | overrides))))
    return path


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ckpt(ckpt_path):
    return load_for_inference(ckpt_path, device="cpu")


@pytest.fixture
def data(tmp_path) -> Path:
    make_blobs(tmp_path / "in", count=3, seed=2)
    make_blobs(tmp_path / "in" / "sub", count=2, seed=3, mode="L")  # gray files into an RGB model
    return tmp_path / "in"


def test_slerp_and_lerp_hit_the_endpoints_and_slerp_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, generator=g)
    b = torch.randn(16, generator=g)
    b = b / b.norm() * a.norm()  # equal norms: slerp stays on that sphere, lerp cuts inside it
    t = torch.linspace(0, 1, 7)
    for path in (slerp(a, b, t), lerp(a, b, t)):
        torch.testing.assert_close(path[0], a)
        torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(slerp(a, b, t).norm(dim=1), a.norm().expand(7), rtol=1e-5, atol=1e-5)
    assert lerp(a, b, t)[3].norm() < 0.99 * a.norm()
    torch.testing.assert_close(slerp(a, 2 * a, t), lerp(a, 2 * a, t))  # parallel: no division by sin(0)


def test_path_segments_share_endpoints_and_reject_unknown_methods():
    anchors = torch.eye(3, 4)  # (K=3, D=4)
    frames = ops.path_segments(anchors, steps=4, method="slerp")
    assert frames.shape == (7, 4)
    for index, anchor in zip((0, 3, 6), anchors):
        torch.testing.assert_close(frames[index], anchor)
    with pytest.raises(DataError, match="slerp or lerp"):
        ops.path_segments(anchors, steps=4, method="cubic")


def test_encode_to_file_round_trip_metadata_and_seeded_z(ckpt, data, tmp_path):
    found = find_images([data])
    out = tmp_path / "z.safetensors"
    path, count = ops.encode_to_file(ckpt, [data], out, batch_size=2, sample=True, seed=5)
    assert path == out and count == 5
    table = load_latents(out)
    assert json.loads(table.metadata["paths"]) == [str(f.path) for f in found]
    assert table.names == [str(f.relative) for f in found]
    assert table.metadata["checkpoint"] == ckpt.identity
    assert json.loads(table.metadata["model_config"])["latent_dim"] == 4
    # the streamed means equal one forward pass over the same images
    x = torch.stack([load_image(f.path, image_size=16, channels=3) for f in found]).float() / 255
    with torch.inference_mode():
        torch.testing.assert_close(table.values, ckpt.model.encode(x).mu, rtol=1e-4, atol=1e-5)
    with pytest.raises(OutputError, match="already exists"):
        ops.encode_to_file(ckpt, [data], out, batch_size=2)
    z_same = ops.encode_to_file(ckpt, [data], tmp_path / "b.safetensors", batch_size=3, sample=True, seed=5)[0]
    z_other = ops.encode_to_file(ckpt, [data], tmp_path / "c.safetensors", batch_size=2, sample=True, seed=6)[0]
    z = load_latents(out, key="z").values
    torch.testing.assert_close(load_latents(z_same, key="z").values, z)  # batch size does not change z
    # z ~ q(z|x): mu + sigma * eps with eps drawn in input order from the seed (the posterior's own sample)
    g = torch.Generator().manual_seed(5)
    eps = torch.cat([torch.randn(rows, 4, generator=g) for rows in (2, 2, 1)])  # batch by batch, as encoded
    mu, logvar = load_latents(out, key="mu").values, load_latents(out, key="logvar").values
    torch.testing.assert_close(z, mu + (0.5 * logvar).exp() * eps)
    assert not torch.allclose(load_latents(z_other, key="z").values, z)


def test_decoded_paths_mirror_safe_names_and_fall_back_to_indices(tmp_path):
    out = tmp_path / "out"
    assert ops.decoded_paths(out, ["a.png", "sub/b.jpg"], 2, ext="png") == [out / "a.png", out / "sub" / "b.png"]
    for hostile in (["../escape.png", "b.png"], ["/etc/passwd", "b.png"], ["x/../../y.png", "b.png"],
                    ["same.png", "same.png"], ["..", "b.png"], ["a.png"]):
        paths = ops.decoded_paths(out, hostile, 2, ext=".png")
        assert paths == [out / "000000.png", out / "000001.png"], hostile
    assert ops.decoded_paths(out, None, 1, ext="jpg") == [out / "000000.jpg"]


def test_write_decoded_refuses_overwrite_skips_existing_and_forces(ckpt, tmp_path):
    z = ops.prior_latents(ckpt, 3, seed=1)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    first = ops.write_decoded(ckpt, z, paths, batch_size=2)
    assert first.written == paths and not first.failed
    paths[1].unlink()
    resumed = ops.write_decoded(ckpt, z, paths, batch_size=2, skip_existing=True)
    assert resumed.written == [paths[1]] and resumed.skipped == [paths[0], paths[2]]
    events = []
    before = [p.stat().st_mtime_ns for p in paths]
    with pytest.raises(OutputError, match=r"0.png already exists \(and 2 more\); pass --skip-existing"):
        ops.write_decoded(ckpt, z, paths, batch_size=2, callback=events.append)  # one error before any work
    assert [p.stat().st_mtime_ns for p in paths] == before and not [e for e in events if isinstance(e, Failed)]
    forced = ops.write_decoded(ckpt, ops.prior_latents(ckpt, 3, seed=2), paths, batch_size=2, force=True)
    assert forced.written == paths
    with pytest.raises(DataError, match="latent_dim is 4"):
        ops.write_decoded(ckpt, torch.zeros(2, 5), paths[:2], batch_size=2)


def test_prior_latents_are_seeded_and_scaled_by_temperature(ckpt):
    a = ops.prior_latents(ckpt, 4000, seed=3)
    torch.testing.assert_close(a, ops.prior_latents(ckpt, 4000, seed=3))
    hot = ops.prior_latents(ckpt, 4000, temperature=2.0, seed=3)
    torch.testing.assert_close(hot, 2 * a)
    assert abs(a.std().item() - 1.0) < 0.05


def test_skip_existing_redoes_empty_files(ckpt, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    paths[0].write_bytes(b"")  # what a power cut can leave behind
    paths[1].write_bytes(b"keep")
    outcome = ops.write_decoded(ckpt, ops.prior_latents(ckpt, 2), paths, batch_size=2, skip_existing=True)
    assert outcome.written == [paths[0]] and outcome.skipped == [paths[1]]
    assert paths[1].read_bytes() == b"keep" and Image.open(paths[0]).size == (16, 16)


def test_kl_ranking_and_traverse_grid(ckpt, data):
    kl = ops.average_kl_per_dim(ckpt, [data], batch_size=2)
    assert kl.shape == (4,) and bool((kl >= 0).all())
    x = torch.stack([load_image(f.path, image_size=16, channels=3) for f in find_images([data])]).float() / 255
    with torch.inference_mode():
        q = ckpt.model.encode(x)
    by_hand = (0.5 * (q.mu.pow(2) + q.logvar.exp() - 1.0 - q.logvar)).mean(0)  # closed-form KL to N(0, 1)
    torch.testing.assert_close(kl.float(), by_hand, rtol=1e-4, atol=1e-5)
    base = torch.tensor([0.5, -1.0, 0.0, 2.0])
    grid = ops.traverse_grid(ckpt, base, [3, 0], steps=5, span=3.0)
    assert grid.shape == (10, 3, 16, 16)
    centre = ops.decode_images(ckpt, base[None])[0]
    torch.testing.assert_close(grid[2], centre)  # the middle column is the start point itself
    torch.testing.assert_close(grid[7], centre)
    assert not torch.allclose(grid[0], grid[4])


def test_load_latents_accepts_npy_and_refuses_bad_files(ckpt_path, tmp_path):
    np.save(tmp_path / "one.npy", np.arange(4, dtype=np.float64))
    assert load_latents(tmp_path / "one.npy").values.shape == (1, 4)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable .npy"):
        load_latents(tmp_path / "obj.npy")  # never unpickled
    with pytest.raises(DataError, match="model checkpoint, not a latents file"):
        load_latents(ckpt_path)
    np.save(tmp_path / "inf.npy", np.array([[0, np.inf, 0, 0]], dtype=np.float32))
    with pytest.raises(DataError, match="NaN or infinite"):
        load_latents(tmp_path / "inf.npy")
    with pytest.raises(DataError, match="does not exist"):
        load_latents(tmp_path / "missing.safetensors")
    assert split_row_reference("runs/z.safetensors:12") == (Path("runs/z.safetensors"), 12)
    assert split_row_reference("image.png") is None


def test_python_api_mirrors_the_commands(ckpt_path, data):
    vae = vaetool.load(ckpt_path, device="cpu", batch_size=2)
    x = vae.load_images(data)  # (5, 3, 16, 16): gray files converted to RGB
    assert x.shape == (5, 3, 16, 16)
    whole = vaetool.load(ckpt_path, device="cpu", batch_size=64)
    torch.testing.assert_close(vae.encode(x).mu, whole.encode(x).mu, rtol=1e-4, atol=1e-5)  # chunking is exact
    torch.testing.assert_close(vae.encode(x[:, :1]).mu, vae.encode(x[:, :1].expand(-1, 3, -1, -1)).mu)
    mu = vae.encode(x).mu
    frames = vae.interpolate(x[0], mu[1], data / "img_002.png", steps=4, method="lerp")
    assert frames.shape == (7, 3, 16, 16)
    torch.testing.assert_close(frames[3], vae.decode(mu[1])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.sample(3, seed=4), vae.sample(3, seed=4))
    assert not torch.allclose(vae.sample(3, seed=4), vae.sample(3, seed=5))
    torch.testing.assert_close(vae.reconstruct(data / "img_000.png"), vae.decode(mu[:1]))
    with pytest.raises(DataError, match="latent_dim is 4"):
        vae.decode(torch.zeros(2, 3))
    with pytest.raises(DataError, match=r"\(B, 1 or 3, 16, 16\)"):
        vae.encode(torch.zeros(1, 3, 8, 8))
    assert vae.identity == load_model(ckpt_path).identity


def test_write_decoded_in_bf16_stays_within_a_few_levels_and_fp16_on_the_cpu_writes_nothing(ckpt, tmp_path):
    from vaetool.errors import ConfigError

    z = ops.prior_latents(ckpt, 6, seed=3)
    images = {}
    for precision in ("fp32", "bf16"):
        paths = [tmp_path / precision / f"s{i}.png" for i in range(6)]
        ops.write_decoded(ckpt, z, paths, batch_size=4, precision=precision, command="sample")
        images[precision] = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in paths])
    difference = np.abs(images["fp32"] - images["bf16"])
    assert difference.max() <= 8 and difference.any()  # bf16 reached the decoder, and stayed close
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        ops.write_decoded(ckpt, z, [tmp_path / "half" / f"s{i}.png" for i in range(6)], batch_size=4,
                          precision="fp16")
    assert not (tmp_path / "half").exists()


def test_encode_in_bf16_stays_close_to_float32_and_fp16_on_the_cpu_stops_before_any_output(ckpt, data, tmp_path):
    from vaetool.errors import ConfigError

    means = {}
    for precision in ("fp32", "bf16"):
        rows = [r for _, r in ops.encode_rows(ckpt, [data], batch_size=4, precision=precision)]
        means[precision] = torch.cat([r["mu"] for r in rows])
    assert means["fp32"].dtype == means["bf16"].dtype == torch.float32  # the file's latents stay float32
    assert not torch.equal(means["fp32"], means["bf16"])  # bf16 reached the encoder
    torch.testing.assert_close(means["bf16"], means["fp32"], rtol=0.1, atol=0.05)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        ops.encode_to_file(ckpt, [data], tmp_path / "half.safetensors", batch_size=4, precision="fp16")
    assert not (tmp_path / "half.safetensors").exists()


def test_interpolate_and_traverse_take_a_precision(ckpt_path, data, tmp_path):
    from typer.testing import CliRunner

    from vaetool.cli.app import app

    runner = CliRunner()
    images = sorted(data.glob("*.png"))[:2]
    frames = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"frames-{precision}"
        result = runner.invoke(app, ["interpolate", str(ckpt_path), *map(str, images), "-o", str(out), "--steps", "3",
                                     "--precision", precision, "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output
        frames[precision] = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("*.png"))])
    difference = np.abs(frames["fp32"] - frames["bf16"])
    assert difference.max() <= 8 and difference.any()  # bf16 reached the decoder, and stayed close
    grids = {}
    for precision in ("fp32", "bf16"):
        grid = tmp_path / f"grid-{precision}.png"
        result = runner.invoke(app, ["traverse", str(ckpt_path), "-o", str(grid), "--rows", "2",
                                     "--precision", precision, "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output
        grids[precision] = np.asarray(Image.open(grid), dtype=np.int16)
    assert np.abs(grids["fp32"] - grids["bf16"]).any()  # the sweep was decoded in bf16
    result = runner.invoke(app, ["traverse", str(ckpt_path), "-o", str(tmp_path / "half.png"), "--precision", "fp16",
                                 "--device", "cpu"])
    assert result.exit_code != 0 and "fp16 needs a CUDA GPU" in result.output and not (tmp_path / "half.png").exists()
