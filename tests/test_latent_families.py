"""The latent commands, their engine and the Python API for every model family (vector, spatial, hierarchical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

import vaetool
from conftest import make_blobs
from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.cli.options import parse_temperature, temperature_value
from vaetool.config import ModelConfig
from vaetool.errors import ConfigError, DataError
from vaetool.inference import latent_ops as ops
from vaetool.inference import latent_space as space
from vaetool.inference.latent_files import anchor_latents, read_latents
from vaetool.inference.load import load_for_inference
from vaetool.io.decode import load_image
from vaetool.io.find import find_images
from vaetool.io.latents import load_latents, save_latents
from vaetool.models.base import build_model
from vaetool.models.prior import fit_mixture

CONFIGS = {
    "vector": ModelConfig(image_size=16, widths=(8, 16), latent_dim=4),
    "spatial": ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=2, downsample=4),
    # widths (8, 16) and f = 2: levels top (4,), z4 (2, 4, 4), z2 (2, 8, 8)
    "hierarchical": ModelConfig(kind="hierarchical", image_size=16, widths=(8, 16), latent_dim=4,
                                latent_channels=2, downsample=2),
}
SHAPES = {"vector": {"z": (4,)}, "spatial": {"z": (2, 4, 4)},
          "hierarchical": {"top": (4,), "z4": (2, 4, 4), "z2": (2, 8, 8)}}
FAMILIES = list(CONFIGS)
runner = CliRunner()


def tiny_checkpoint(folder: Path, kind: str) -> Path:
    """An untrained, seeded 16 px model of this family, saved as a checkpoint."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    return save_model(folder / "model.safetensors", build_model(CONFIGS[kind]))


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {kind: tiny_checkpoint(root / kind, kind) for kind in FAMILIES}


@pytest.fixture(scope="module")
def ckpts(paths):
    return {kind: load_for_inference(path, device="cpu") for kind, path in paths.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images") / "in"
    make_blobs(folder, count=3, seed=4)
    make_blobs(folder / "sub", count=2, seed=5)
    return folder


def images(folder: Path) -> torch.Tensor:
    return torch.stack([load_image(f.path, image_size=16, channels=3) for f in find_images([folder])]).float() / 255


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("kind", FAMILIES)
def test_encode_file_holds_every_level_with_its_shape_and_decodes_to_the_reconstruction(ckpts, data, tmp_path, kind):
    ckpt = ckpts[kind]
    out, _ = ops.encode_to_file(ckpt, [data], tmp_path / "z.safetensors", batch_size=2, sample=True, seed=3)
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    expected = {"mu", "logvar", "z"} if kind == "vector" else {f"{n}.{f}" for n in SHAPES[kind] for f in ("mu", "logvar", "z")}
    assert keys == expected
    assert json.loads(metadata["levels"]) == [[n, list(s)] for n, s in SHAPES[kind].items()]  # top-down order
    assert metadata["family"] == kind and json.loads(metadata["image_size"]) == [16, 16]
    table = load_latents(out)
    assert {n: tuple(v.shape) for n, v in table.levels.items()} == {n: (5, *s) for n, s in SHAPES[kind].items()}
    with torch.inference_mode():
        expected_images = ckpt.model.reconstruct(images(data))
    torch.testing.assert_close(ops.decode_images(ckpt, table.levels), expected_images, rtol=1e-4, atol=1e-4)
    written = ops.write_decoded(ckpt, read_latents(ckpt, out).levels,
                                ops.decoded_paths(tmp_path / "dec", table.names, table.count, ext="png"), batch_size=2)
    assert len(written.written) == 5 and not written.failed
    # z ~ q(z|x): seeded image by image, so the batch size does not change it
    again, _ = ops.encode_to_file(ckpt, [data], tmp_path / "b.safetensors", batch_size=3, sample=True, seed=3)
    for name, value in load_latents(out, key="z").levels.items():
        torch.testing.assert_close(load_latents(again, key="z").levels[name], value)
        assert not torch.allclose(value, table.levels[name])


@pytest.mark.parametrize("kind", FAMILIES)
def test_decode_refuses_latents_whose_levels_or_shapes_do_not_fit_in_one_line(ckpts, paths, tmp_path, kind):
    wrong = {n: (s[0] + 1, *s[1:]) for n, s in SHAPES[kind].items()}  # one channel / dimension too many
    keys = {("mu" if kind == "vector" else f"{n}.mu"): torch.zeros(2, *s) for n, s in wrong.items()}
    bad = save_latents(tmp_path / "bad.safetensors", keys, paths=["a", "b"], relative=["a", "b"], identity="x",
                       config={}, levels=wrong, family=kind)
    with pytest.raises(DataError, match="bad.safetensors"):
        read_latents(ckpts[kind], bad)
    result = invoke("decode", paths[kind], bad, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error:") and "bad.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    other = next(k for k in FAMILIES if k != kind)
    with pytest.raises(DataError, match="use latents encoded with the same checkpoint"):
        ops.write_decoded(ckpts[kind], space.sample_latents(ckpts[other], 2), [tmp_path / "x.png"] * 2, batch_size=2)


@pytest.mark.parametrize("kind", FAMILIES)
def test_sample_is_seeded_and_independent_of_the_batch_size(ckpts, kind):
    ckpt = ckpts[kind]
    a = space.sample_latents(ckpt, 5, seed=1, batch_size=2)
    b = space.sample_latents(ckpt, 5, seed=1, batch_size=5)
    c = space.sample_latents(ckpt, 5, seed=2, batch_size=2)
    assert {n: tuple(v.shape[1:]) for n, v in a.items()} == SHAPES[kind]
    for name in a:
        torch.testing.assert_close(a[name], b[name])
        assert not torch.allclose(a[name], c[name])
    torch.testing.assert_close(ops.decode_images(ckpt, a, batch_size=2), ops.decode_images(ckpt, b))
    if kind == "vector":  # the vector family's samples are the ones it drew before the families
        torch.testing.assert_close(a["z"], ops.prior_latents(ckpt, 5, seed=1))


def test_per_level_temperatures_parse_and_scale_each_level():
    assert temperature_value(parse_temperature("0.7")) == 0.7
    assert temperature_value(parse_temperature("top=1, z8=0.6")) == {"top": 1.0, "z8": 0.6}
    for bad in ("hot", "top=", "=1", "top=-1", "0", "top=1,z8=nan"):
        with pytest.raises(typer.BadParameter):
            parse_temperature(bad)


def test_hierarchical_temperature_per_level(ckpts):
    ckpt = ckpts["hierarchical"]
    base = space.sample_latents(ckpt, 3, seed=4)
    hot_top = space.sample_latents(ckpt, 3, seed=4, temperature={"top": 2.0})
    torch.testing.assert_close(hot_top["top"], 2 * base["top"])
    assert not torch.allclose(hot_top["z2"], base["z2"])  # the levels below are drawn given the top
    cold = space.sample_latents(ckpt, 3, seed=4, temperature={"z2": 1e-6})
    torch.testing.assert_close(cold["top"], base["top"])
    torch.testing.assert_close(cold["z4"], base["z4"])
    means = space.complete_below(ckpt, {"top": base["top"], "z4": base["z4"]}, temperature=0.0)
    torch.testing.assert_close(cold["z2"], means["z2"], rtol=1e-4, atol=1e-4)  # T -> 0: the prior means
    with pytest.raises(ConfigError, match="no latent level 'z8'"):
        space.sample_latents(ckpt, 2, temperature={"z8": 0.5})


@pytest.mark.parametrize("kind", ["vector", "hierarchical"])
def test_fitted_prior_is_used_by_auto_and_fitted_and_refused_when_absent(paths, kind, tmp_path):
    ckpt = load_for_inference(paths[kind], device="cpu")
    with pytest.raises(ConfigError, match="vaetool fit-prior"):
        space.sample_latents(ckpt, 2, prior="fitted")
    level = ckpt.model.vector_level
    fitted = fit_mixture(torch.randn(200, 4) * 0.1 + 3.0, components=1, generator=torch.Generator().manual_seed(0),
                         level=level)
    ckpt.prior = fitted  # what `vaetool fit-prior` stores beside the weights
    drawn = space.sample_latents(ckpt, 50, seed=1)
    torch.testing.assert_close(drawn[level], fitted.sample(50, generator=torch.Generator().manual_seed(1)))
    assert drawn[level].mean() > 2.5  # from the fitted mixture near 3, not N(0, I)
    torch.testing.assert_close(space.sample_latents(ckpt, 50, seed=1, prior="fitted")[level], drawn[level])
    assert space.sample_latents(ckpt, 50, seed=1, prior="standard")[level].mean().abs() < 0.5
    result = invoke("sample", paths[kind], "-n", 2, "--prior", "fitted", "-o", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 1 and "vaetool fit-prior" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("kind", FAMILIES)
def test_interpolation_endpoints_are_the_anchors_decodes(ckpts, paths, data, tmp_path, kind):
    ckpt, vae = ckpts[kind], vaetool.load(paths[kind], device="cpu")
    files = [str(f.path) for f in find_images([data])]
    out, _ = ops.encode_to_file(ckpt, [data], tmp_path / "z.safetensors", batch_size=2)
    anchors = anchor_latents(ckpt, [files[0], f"{out}:2"])
    for name, value in load_latents(out).levels.items():
        torch.testing.assert_close(anchors[name][1], value[2])
    for method in ("slerp", "lerp"):
        frames = space.interpolate_latents(ckpt, anchors, steps=4, method=method)
        assert all(v.shape[0] == 4 for v in frames.values())
        pixels = ops.decode_images(ckpt, frames)
        torch.testing.assert_close(pixels[0], vae.reconstruct(files[0])[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pixels[-1], vae.reconstruct(files[2])[0], rtol=1e-4, atol=1e-4)
    api_frames = vae.interpolate(files[0], files[1], files[2], steps=3)
    assert api_frames.shape == (5, 3, 16, 16)
    torch.testing.assert_close(api_frames[2], vae.reconstruct(files[1])[0], rtol=1e-4, atol=1e-4)
    if kind != "hierarchical":
        with pytest.raises(ConfigError, match="needs a hierarchical model"):
            space.interpolate_latents(ckpt, anchors, steps=3, levels="top")


def test_interpolate_top_only_takes_the_levels_below_from_their_prior(ckpts, data):
    ckpt = ckpts["hierarchical"]
    files = [str(f.path) for f in find_images([data])][:2]
    anchors = anchor_latents(ckpt, files)
    frames = space.interpolate_latents(ckpt, anchors, steps=5, levels="top")
    torch.testing.assert_close(frames["top"], space.level_path({"top": anchors["top"]}, steps=5, method="slerp")["top"])
    with torch.inference_mode():
        means = ckpt.model.sample_prior(5, temperature=0.0, given={"top": frames["top"]})
    for name in ("z4", "z2"):
        torch.testing.assert_close(frames[name], means[name])
        assert not torch.allclose(frames[name][0], anchors[name][0])  # not the posterior's: the prior's, given top
    warm = space.interpolate_latents(ckpt, anchors, steps=5, levels="top", temperature=0.8, seed=1)
    torch.testing.assert_close(warm["z2"], space.interpolate_latents(ckpt, anchors, steps=5, levels="top",
                                                                     temperature=0.8, seed=1)["z2"])
    assert not torch.allclose(warm["z2"], frames["z2"])


def test_traverse_sweeps_the_top_of_a_hierarchy_and_refuses_a_spatial_model(ckpts, paths, data, tmp_path):
    ckpt = ckpts["hierarchical"]
    base = torch.tensor([0.5, -1.0, 0.0, 2.0])
    z = space.traverse_latents(ckpt, base, [3, 0], steps=5, span=2.0)
    assert z["top"].shape == (10, 4) and z["z2"].shape == (10, 2, 8, 8)
    torch.testing.assert_close(z["top"][2], base)  # the middle column is the start point
    grid = ops.traverse_grid(ckpt, base, [3, 0], steps=5, span=2.0)
    torch.testing.assert_close(grid[2], grid[7])
    assert not torch.allclose(grid[0], grid[4])
    kl = ops.average_kl_per_dim(ckpt, [data], batch_size=2)
    assert kl.shape == (4,)  # the top level's dimensions only
    result = invoke("traverse", paths["hierarchical"], "-o", tmp_path / "t.png", "--data", data, "--rows", 2,
                    "--steps", 3, "--image", next(data.glob("*.png")), "--json", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["dims"]) == 2
    assert Image.open(tmp_path / "t.png").size == (3 * 18 + 2, 2 * 18 + 2)
    refused = invoke("traverse", paths["spatial"], "-o", tmp_path / "s.png", "--device", "cpu")
    assert refused.exit_code == 1 and "no latent vector to traverse" in refused.stderr
    assert "interpolate" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("kind", FAMILIES)
def test_python_api_for_every_family(paths, data, kind):
    vae = vaetool.load(paths[kind], device="cpu", batch_size=2)
    x = vae.load_images(data)
    posterior = vae.encode(x)
    assert {n: tuple(q.mu.shape) for n, q in posterior.levels.items()} == {n: (5, *s) for n, s in SHAPES[kind].items()}
    assert posterior.kl().shape == (5,) and bool((posterior.kl() >= 0).all())
    with torch.inference_mode():
        torch.testing.assert_close(vae.reconstruct(x), vae.model.reconstruct(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vae.decode(posterior.mode()), vae.reconstruct(x))
    torch.testing.assert_close(vae.sample(3, seed=2), vae.sample(3, seed=2))
    assert not torch.allclose(vae.sample(3, seed=2), vae.sample(3, seed=3))
    assert vae.sample(2, temperature={next(iter(SHAPES[kind])): 0.5}).shape == (2, 3, 16, 16)
    if kind == "vector":
        torch.testing.assert_close(vae.decode(posterior.mu), vae.reconstruct(x))  # the README's example
        assert posterior.sample(torch.Generator().manual_seed(0)).shape == (5, 4)
    elif kind == "hierarchical":
        assert posterior.mu.shape == (5, 4)  # the top level's
        with pytest.raises(DataError, match="levels top, z4, z2"):
            vae.decode(posterior.mu)
    else:
        assert vae.encode(torch.rand(1, 3, 32, 24)).levels["z"].mu.shape == (1, 2, 8, 6)  # any size f divides
        with pytest.raises(DataError, match="multiples of 4"):
            vae.encode(torch.rand(1, 3, 18, 16))


@pytest.mark.parametrize("kind", ["spatial", "hierarchical"])
def test_json_lines_and_npy_for_levelled_latents(paths, data, tmp_path, kind):
    lines = invoke("encode", paths[kind], data, "-o", "-", "--device", "cpu", "-q")
    assert lines.exit_code == 0, lines.output
    first = json.loads(lines.stdout.splitlines()[0])
    assert first["shapes"] == {n: list(s) for n, s in SHAPES[kind].items()}
    assert {n: len(v) for n, v in first["mu"].items()} == {n: int(torch.tensor(s).prod()) for n, s in SHAPES[kind].items()}
    refused = invoke("encode", paths[kind], data, "-o", tmp_path / "z.npy", "--device", "cpu")
    assert refused.exit_code == 1 and ".safetensors" in refused.stderr and not (tmp_path / "z.npy").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spatial", "hierarchical"])
def test_installed_command_end_to_end(paths, data, tmp_path, kind):
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    exe = str(Path(sys.executable).with_name("vaetool"))
    ckpt, z = paths[kind], tmp_path / "z.safetensors"
    temperature = "top=1,z2=0.5" if kind == "hierarchical" else "0.8"
    script = (f"{exe} encode {ckpt} {data} -o {z} --sample --device cpu -q && "
              f"{exe} decode {ckpt} {z} -o {tmp_path / 'dec'} --key z --device cpu -q && "
              f"{exe} sample {ckpt} -n 3 -t {temperature} -o {tmp_path / 's'} --device cpu -q && "
              f"{exe} interpolate {ckpt} {z}:0 {z}:1 --steps 3 -o {tmp_path / 'f'} --device cpu -q")
    if kind == "hierarchical":
        script += f" --levels top && {exe} traverse {ckpt} --rows 2 --steps 3 -o {tmp_path / 't.png'} --device cpu -q"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(z)
    assert sorted(lines[1:6]) == sorted(str((tmp_path / "dec" / f.relative).with_suffix(".png"))
                                        for f in find_images([data]))
    assert len(lines) == 1 + 5 + 3 + 3 + (1 if kind == "hierarchical" else 0)
    assert all(Path(p).is_file() for p in lines)
