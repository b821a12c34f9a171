"""Reconstructing folders (vaetool.inference.reconstruct): the vector family at its size, the any-size families whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_blobs
from vaetool.checkpoint import save_model
from vaetool.config import ModelConfig
from vaetool.errors import OutputError
from vaetool.events import Progress, Written
from vaetool.inference.load import load_for_inference
from vaetool.inference.reconstruct import reconstruct_folder
from vaetool.inference.tiling import pad_to, round_up
from vaetool.io.decode import read_image
from vaetool.io.find import find_images
from vaetool.models.base import build_model

VAETOOL = str(Path(sys.executable).with_name("vaetool"))
FAMILIES = {
    "vector": ModelConfig(image_size=16, widths=(8, 16), latent_dim=4),
    "spatial": ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=2, downsample=4),
    "hierarchical": ModelConfig(kind="hierarchical", image_size=16, latent_dim=4, widths=(8, 16),
                                latent_channels=2, downsample=2),
}


def _save(folder: Path, kind: str, **overrides) -> Path:
    torch.manual_seed(0)
    config = ModelConfig.from_dict(FAMILIES[kind].to_dict() | overrides)
    return save_model(folder / f"{kind}.safetensors", build_model(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {kind: _save(folder, kind) for kind in FAMILIES}


@pytest.fixture
def data(tmp_path) -> Path:
    make_blobs(tmp_path / "in", count=3, seed=2)
    make_blobs(tmp_path / "in" / "sub", count=2, seed=3, mode="L")  # gray files into an RGB model
    return tmp_path / "in"


def _smooth(height: int, width: int, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    low = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
    pixels = F.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 1)[0]  # (3, H, W)
    image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8), "RGB")
    return image.convert(mode)


def _expected(model, pixels: torch.Tensor) -> torch.Tensor:
    """What the whole-image path should give: reflect-padded to the multiple, reconstructed, cropped."""
    c, h, w = pixels.shape
    m = model.size_multiple
    x = pad_to(pixels, round_up(h, m), round_up(w, m))[None]
    x = x.expand(1, 3, *x.shape[-2:]) if c == 1 else x
    out = model.reconstruct(x)[0, :, :h, :w]
    return (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None] if c == 1 else out


# ------------------------------------------------------------------------------ the vector family, as before


def test_reconstruct_folder_mirrors_tree_keeps_format_and_converts_channels(models, data, tmp_path):
    ckpt = load_for_inference(models["vector"], device="cpu")
    Image.open(data / "img_000.png").save(data / "photo.jpg")
    found = find_images([data])
    out = tmp_path / "rec"
    outcome = reconstruct_folder(ckpt, [data], out, batch_size=2, grid=tmp_path / "grid.png", grid_count=4)
    assert sorted(outcome.written) == sorted(out / f.relative for f in found)
    assert (out / "photo.jpg").is_file() and (out / "sub" / "img_001.png").is_file()
    assert Image.open(out / "sub" / "img_001.png").mode == "RGB"  # gray input, RGB model
    assert Image.open(tmp_path / "grid.png").size == (4 * 18 + 2, 2 * 18 + 2)  # originals above reconstructions
    with pytest.raises(OutputError, match="overwrite the input"):
        reconstruct_folder(ckpt, [data], data, batch_size=2, force=True)  # --force lets -o be the input folder
    gray = load_for_inference(_save(tmp_path, "vector", channels=1), device="cpu")
    reconstruct_folder(gray, [data], tmp_path / "g", batch_size=4, ext="png")
    assert Image.open(tmp_path / "g" / "img_002.png").mode == "L"  # RGB input, gray model


def test_unreadable_inputs_are_reported_and_the_rest_written(models, data, tmp_path):
    for kind in FAMILIES:
        (data / "bad.png").write_bytes(b"\x89PNG broken")
        events = []
        outcome = reconstruct_folder(load_for_inference(models[kind], device="cpu"), [data], tmp_path / kind,
                                     batch_size=2, callback=events.append)
        assert [Path(p).name for p, _ in outcome.failed] == ["bad.png"], kind
        assert len(outcome.written) == 5 and sorted(outcome.written) == sorted(Path(e.output) for e in events
                                                                                 if isinstance(e, Written))
        assert [e for e in events if isinstance(e, Progress)][-1] == Progress(6, 6), kind


def test_a_vector_model_still_reconstructs_at_its_own_size(models, tmp_path):
    (tmp_path / "in").mkdir()
    _smooth(60, 100).save(tmp_path / "in" / "wide.png")
    reconstruct_folder(load_for_inference(models["vector"], device="cpu"), [tmp_path / "in"], tmp_path / "out",
                       batch_size=2)
    assert Image.open(tmp_path / "out" / "wide.png").size == (16, 16)


# ------------------------------------------------------------------------------ spatial and hierarchical: any size


@pytest.mark.parametrize("kind", ["spatial", "hierarchical"])
def test_a_100x60_image_is_reconstructed_whole_at_its_own_size(kind, models, tmp_path):
    (tmp_path / "in").mkdir()
    _smooth(60, 100).save(tmp_path / "in" / "wide.png")
    _smooth(37, 23, seed=1, mode="L").save(tmp_path / "in" / "odd.png")  # sides no multiple of f: padded, cropped
    ckpt = load_for_inference(models[kind], device="cpu")
    outcome = reconstruct_folder(ckpt, [tmp_path / "in"], tmp_path / "out", batch_size=4, grid=tmp_path / "g.png")
    assert len(outcome.written) == 2 and not outcome.failed
    wide, odd = Image.open(tmp_path / "out" / "wide.png"), Image.open(tmp_path / "out" / "odd.png")
    assert (wide.size, wide.mode) == ((100, 60), "RGB") and (odd.size, odd.mode) == ((23, 37), "L")
    for name in ("wide.png", "odd.png"):
        expected = _expected(ckpt.model, read_image(tmp_path / "in" / name).pixels)
        got = read_image(tmp_path / "out" / name).pixels
        assert (got - expected).abs().max() <= 1 / 255 + 1e-5, name  # whole, not resized
    assert Image.open(tmp_path / "g.png").size == (2 * 18 + 2, 2 * 18 + 2)


def test_tiles_only_above_the_memory_bound_each_tile_at_its_own_size(models, tmp_path):
    from vaetool.inference.tiledenoise import ModelRunner, join_outputs

    ckpt = load_for_inference(models["spatial"], device="cpu")
    run, image = ModelRunner(ckpt.model), read_image_tensor(64, 96)
    whole, layout = run.split(image, tile=None, max_pixels=64 * 96, overlap=0.25)
    assert whole.shape == (1, 3, 64, 96) and layout.count == 1
    assert run.split(image, tile=None, max_pixels=64 * 96 - 1, overlap=0.25)[1].count > 1  # one pixel too many
    tiles, layout = run.split(image, tile=None, max_pixels=2000, overlap=0.25)
    assert tiles.shape[1:] == (3, 44, 44) and layout.count > 1  # the largest multiple of f within the bound
    # no overlap: each region of the output is its tile's own reconstruction, nothing resized
    (tmp_path / "in").mkdir()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "in" / "x.png")
    reconstruct_folder(ckpt, [tmp_path / "in"], tmp_path / "tiled", batch_size=4, tile=32, overlap=0.0)
    got, x = read_image(tmp_path / "tiled" / "x.png").pixels, read_image(tmp_path / "in" / "x.png").pixels
    for top, left in ((0, 0), (32, 64)):
        expected = ckpt.model.reconstruct(x[None, :, top:top + 32, left:left + 32])[0]
        assert (got[:, top:top + 32, left:left + 32] - expected).abs().max() <= 1 / 255 + 1e-5
    assert join_outputs(tiles, layout).shape == image.shape


def read_image_tensor(height: int, width: int) -> torch.Tensor:
    low = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(4))
    return F.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_installed_command_end_to_end(kind, models, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    _smooth(60, 100).save(tmp_path / "in" / "wide.png")
    _smooth(30, 30, mode="L").save(tmp_path / "in" / "sub" / "gray.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"nope")
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    result = subprocess.run([VAETOOL, "reconstruct", str(models[kind]), str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 3, result.stderr
    assert sorted(result.stdout.split()) == sorted(str(tmp_path / "out" / p) for p in ("wide.png", "sub/gray.png"))
    assert "bad.png" in result.stderr and "done 2, skipped 0, failed 1 (of 3)" in result.stderr
    size = (16, 16) if kind == "vector" else (100, 60)
    assert Image.open(tmp_path / "out" / "wide.png").size == size


def test_bf16_reconstructs_every_family_within_a_few_levels_of_float32(models, data, tmp_path):
    for kind in FAMILIES:
        differing = 0
        ckpt = load_for_inference(models[kind], device="cpu")
        for precision in ("fp32", "bf16"):
            reconstruct_folder(ckpt, [data], tmp_path / kind / precision, batch_size=2, precision=precision)
        for exact in sorted((tmp_path / kind / "fp32").rglob("*.png")):
            fast = tmp_path / kind / "bf16" / exact.relative_to(tmp_path / kind / "fp32")
            a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (exact, fast))
            assert a.shape == b.shape and np.abs(a - b).max() <= 8, (kind, exact.name)
            differing += int((a != b).sum())
        assert differing > 0, f"{kind}: bf16 gave float32's pixels exactly; the precision did not reach the model"


def test_fp16_on_the_cpu_is_refused_before_any_output(models, data, tmp_path):
    from vaetool.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        reconstruct_folder(load_for_inference(models["spatial"], device="cpu"), [data], tmp_path / "out",
                           batch_size=2, precision="fp16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
