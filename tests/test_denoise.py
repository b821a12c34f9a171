"""The denoising engine: tiling, batching across images, channels, alpha, bit depth, and a trained denoiser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_blobs, tiny_families, tiny_model
from vaetool.checkpoint import load_model, save_model
from vaetool.config import Corruption, ModelConfig, TrainConfig
from vaetool.training.corrupt import add_gaussian_noise
from vaetool.errors import ConfigError
from vaetool.events import Progress, Warning, Written
from vaetool.inference.denoise import denoise_files
from vaetool.inference.folder import plan_outputs
from vaetool.inference.tiledenoise import ModelRunner, denoise_image, join_outputs, mix, resolve_tile, split_image
from vaetool.io.decode import read_image
from vaetool.io.find import FoundImage, find_images
from vaetool.inference.tiling import plan_tiles


def _tiny(channels: int = 3, seed: int = 0) -> torch.nn.Module:
    from vaetool.models.vector import VAE

    torch.manual_seed(seed)
    return VAE(ModelConfig(image_size=16, channels=channels, widths=(8, 16), latent_dim=4)).eval()


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


# ------------------------------------------------------------------------------- in-memory tiling


def test_image_of_exactly_the_tile_size_is_identical_tiled_and_untiled():
    model, image = _tiny(), _rand(3, 16, 16)
    tiled = denoise_image(model, image, tile="auto")
    untiled = denoise_image(model, image, tile="off")
    direct = ModelRunner(model)(image[None])[0]
    assert torch.equal(tiled, untiled)
    assert torch.equal(tiled, direct)
    assert not torch.allclose(tiled, image, atol=0.05)  # the model did something


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A local operator standing in for a model that could run on any size: 3x3 Gaussian blur."""
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (torch.outer(kernel, kernel) / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


def test_tiled_is_close_to_whole_image_on_a_larger_image():
    image = F.interpolate(_rand(1, 3, 12, 15), size=(45, 61), mode="bicubic").clamp(0, 1)[0]  # (3, 45, 61)
    inputs, layout = split_image(image, model_size=16, model_channels=3, tile=16, overlap=0.25)
    assert layout.count == inputs.shape[0] > 9
    tiled = join_outputs(_blur(inputs), layout)
    whole = _blur(image[None])[0]
    assert tiled.shape == image.shape
    assert (tiled - whole).abs().mean() < 2e-3
    assert (tiled - whole).abs().max() < 0.05
    # without blending (no overlap) the tile edges are worse: the window is what hides them
    hard = join_outputs(_blur(split_image(image, model_size=16, model_channels=3, tile=16, overlap=0.0)[0]),
                        split_image(image, model_size=16, model_channels=3, tile=16, overlap=0.0)[1])
    assert (hard - whole).abs().mean() > (tiled - whole).abs().mean()


@pytest.mark.parametrize(("channels", "model_channels"), [(1, 1), (3, 3), (1, 3), (3, 1)])
@pytest.mark.parametrize("size", [(5, 9), (16, 16), (40, 23)])
def test_identity_model_gives_the_image_back_for_every_channel_combination(channels, model_channels, size):
    image = _rand(channels, *size, seed=channels)
    inputs, layout = split_image(image, model_size=16, model_channels=model_channels, tile=16)
    assert inputs.shape[1:] == (model_channels, 16, 16)
    torch.testing.assert_close(join_outputs(inputs, layout), image, atol=1e-6, rtol=0)


def test_a_tile_size_other_than_the_model_size_resizes_tiles():
    image = torch.full((3, 50, 70), 0.25)
    inputs, layout = split_image(image, model_size=16, model_channels=3, tile=32)
    assert inputs.shape[1:] == (3, 16, 16) and layout.count == len(plan_tiles(50, 70, tile=32).positions)
    torch.testing.assert_close(join_outputs(inputs, layout), image, atol=1e-6, rtol=0)


def test_colour_image_through_a_gray_model_is_denoised_channel_by_channel():
    gray_model, image = _tiny(channels=1), _rand(3, 20, 24, seed=3)
    out = denoise_image(gray_model, image)
    per_channel = torch.cat([denoise_image(gray_model, image[c: c + 1]) for c in range(3)])
    assert out.shape == (3, 20, 24)
    torch.testing.assert_close(out, per_channel, atol=1e-5, rtol=0)


def test_gray_image_through_a_colour_model_is_replicated_then_turned_back_to_luma():
    model, image = _tiny(channels=3), _rand(1, 16, 16, seed=4)
    out = denoise_image(model, image)
    rgb = ModelRunner(model)(image.expand(3, 16, 16)[None])[0]
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert out.shape == (1, 16, 16)
    torch.testing.assert_close(out[0], luma, atol=1e-6, rtol=0)


def test_strength_blends_with_the_input():
    model, image = _tiny(), _rand(3, 16, 16, seed=5)
    full = denoise_image(model, image, strength=1.0)
    assert torch.equal(denoise_image(model, image, strength=0.0), image)
    torch.testing.assert_close(denoise_image(model, image, strength=0.5), (full + image) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(mix(full, image, 0.25), 0.25 * full + 0.75 * image, atol=1e-6, rtol=0)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError):
        denoise_image(_tiny(), _rand(3, 16, 16), strength=1.5)
    with pytest.raises(ConfigError):
        denoise_image(_tiny(), _rand(3, 16, 16), overlap=1.0)
    with pytest.raises(ConfigError):
        resolve_tile("big", 16)
    assert resolve_tile("auto", 16) == 16 and resolve_tile("off", 16) is None and resolve_tile("24", 16) == 24


def test_output_names_keep_folders_and_never_collide_with_a_new_extension(tmp_path):
    found = [FoundImage(Path(p), Path(p)) for p in ("a.png", "a.jpg", "sub/é b.tif", "a_jpg.png")]
    tasks, renamed = plan_outputs(found, tmp_path, ext="png", suffix="_dn")
    names = [t.output.relative_to(tmp_path).as_posix() for t in tasks]
    assert names[0] == "a_dn.png" and names[2] == "sub/é b_dn.png"
    assert len(set(names)) == 4 and renamed == 1
    kept, _ = plan_outputs(found, tmp_path)
    assert [t.output.relative_to(tmp_path).as_posix() for t in kept] == ["a.png", "a.jpg", "sub/é b.tif", "a_jpg.png"]


# ------------------------------------------------------------------------------------ folder engine


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    return save_model(tmp_path / "tiny.safetensors", _tiny())


def test_tiles_batched_across_images_match_images_done_one_by_one(tmp_path, tiny_ckpt):
    folder = tmp_path / "in"
    make_blobs(folder, count=2, size=16)
    make_blobs(folder / "big", count=2, size=37, seed=1)
    make_blobs(folder / "small", count=1, size=9, seed=2)
    events = []
    summary = denoise_files(tiny_ckpt, [folder], tmp_path / "out", batch_size=3, device="cpu", workers=2,
                            callback=events.append)
    assert len(summary.written) == 5 and not summary.failed and not summary.skipped
    written = [e for e in events if isinstance(e, Written)]
    assert [e.input for e in written] == [str(f.path) for f in find_images([folder])]  # in input order
    assert [e.done for e in events if isinstance(e, Progress)] == [1, 2, 3, 4, 5]
    model = load_model(tiny_ckpt).model
    for d in written:
        expected = denoise_image(model, read_image(d.input).pixels)
        got = read_image(d.output).pixels
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_alpha_passes_through_unchanged(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(21, 30, 4), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "x.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "in" / "y.png")
    summary = denoise_files(tiny_ckpt, [tmp_path / "in"], tmp_path / "out", device="cpu")
    assert len(summary.written) == 2
    out = np.asarray(Image.open(tmp_path / "out" / "x.png"))
    assert Image.open(tmp_path / "out" / "x.png").mode == "RGBA"
    assert np.array_equal(out[..., 3], rgba[..., 3])
    assert not np.array_equal(out[..., :3], rgba[..., :3])
    gray = Image.open(tmp_path / "out" / "y.png")
    assert gray.mode == "LA" and np.array_equal(np.asarray(gray)[..., 1], rgba[..., 3])


def _sixteen_bit_png(path: Path, seed: int) -> np.ndarray:
    values = (np.random.default_rng(seed).random((18, 20)) * 65535).astype("<u2")
    Image.frombytes("I;16", (20, 18), values.tobytes()).save(path)
    return values


def test_sixteen_bit_keeps_its_depth_or_warns_once(tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    values = [_sixteen_bit_png(tmp_path / "in" / f"deep{k}.png", k) for k in range(2)]
    denoise_files(tiny_ckpt, [tmp_path / "in"], tmp_path / "png", device="cpu")
    deep = Image.open(tmp_path / "png" / "deep0.png")
    assert deep.mode in ("I;16", "I") and np.any(np.asarray(deep) % 257 != 0)  # not 8-bit values scaled up
    denoise_files(tiny_ckpt, [tmp_path / "in"], tmp_path / "same", device="cpu", strength=0.0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "same" / "deep1.png")), values[1])  # every bit kept
    events = []
    denoise_files(tiny_ckpt, [tmp_path / "in"], tmp_path / "jpg", ext="jpg", device="cpu",
                  callback=events.append)
    warnings = [e.message for e in events if isinstance(e, Warning) and "16-bit" in e.message]  # one per run, not per file
    assert len(warnings) == 1 and "deep0.png" in warnings[0] and "8 bits" in warnings[0]
    assert Image.open(tmp_path / "jpg" / "deep1.jpg").mode == "L"


# ------------------------------------------------------------------------------- a trained denoiser


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory) -> torch.nn.Module:
    """A tiny denoising VAE trained for 200 steps on smooth blobs (about 10 s on 2 busy cores).

    At a constant rate: with the cosine schedule this 200-step tiny model did not reach +1 dB (see the training notes).
    """
    from vaetool.training.trainer import train

    root = tmp_path_factory.mktemp("denoiser")
    make_blobs(root / "train", count=800, size=16, seed=1)  # 50 steps an epoch: few end-of-epoch saves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, above all on busy cores
    try:
        result = train([root / "train"], root / "run",
                       model_config=ModelConfig(image_size=16, widths=(16, 32), latent_dim=16, blocks=0),
                       train_config=TrainConfig(steps=200, batch_size=16, seed=0, val_fraction=0.0, log_every=50,
                                                corruptions=(Corruption.parse("gaussian:0.05-0.2"),), lr_schedule="constant"),
                       device="cpu", detect_channels=False, cache_memory=1 << 30)
    finally:
        torch.set_num_threads(threads)
    loaded = load_model(result.checkpoint)
    assert [str(c) for c in loaded.train_config.corruptions] == ["gaussian:0.05-0.2"]
    return loaded.model


def test_a_trained_denoiser_raises_psnr_on_noisy_images(denoiser, tmp_path):
    generator = torch.Generator().manual_seed(0)
    before, after = [], []
    for path in make_blobs(tmp_path / "test", count=8, size=16, seed=99):  # images it never saw
        clean = read_image(path).pixels
        noisy = add_gaussian_noise(clean, 0.1, generator=generator)
        before.append(_psnr(noisy, clean))
        after.append(_psnr(denoise_image(denoiser, noisy), clean))
    assert np.mean(after) > np.mean(before) + 1.0, (np.mean(before), np.mean(after))


def _boundary_gaps(length: int, tile: int, overlap: float) -> list[int]:
    """Indices j where pixels j and j+1 come from different tiles' edges (a tile starts at j+1 or ends at j)."""
    starts = sorted({left for _, left in plan_tiles(tile, length, tile=tile, overlap=overlap).positions})
    return sorted({s - 1 for s in starts if s > 0} | {s + tile - 1 for s in starts if s + tile < length})


def _seam_ratio(images: list[torch.Tensor], tile: int, overlap: float, cell: int) -> float:
    """Mean |difference| of neighbouring pixels across tile boundaries / the same between pixels inside tiles.

    The decoder draws each tile on a grid of `cell`-pixel blocks (its bottom feature map upsampled), and
    tile edges fall on block edges; so the inside gaps compared are block edges too (same phase mod
    `cell`), otherwise the model's own block structure would read as a seam.
    """
    across, inside = [], []
    for image in images:
        for dim in (-1, -2):
            diff = image.diff(dim=dim).abs().transpose(dim, -1).mean(dim=(0, 1))  # (L-1,)
            gaps = _boundary_gaps(image.shape[dim], tile, overlap)
            assert all(j % cell == cell - 1 for j in gaps)
            across.append(diff[gaps])
            inside.append(diff[[j for j in range(diff.shape[0]) if j not in gaps and j % cell == cell - 1]])
    return float(torch.cat(across).mean() / torch.cat(inside).mean())


def test_no_seams_across_tile_boundaries(denoiser, tmp_path):
    noisy = [add_gaussian_noise(read_image(path).pixels, 0.1, generator=torch.Generator().manual_seed(seed))
             for seed in range(3, 12) for path in make_blobs(tmp_path / str(seed), count=1, size=64, seed=seed)]
    cell = denoiser.config.image_size // denoiser.config.bottom_size
    blended = [denoise_image(denoiser, x, tile="auto", overlap=0.25) for x in noisy]  # (3, 64, 64) each
    hard = [denoise_image(denoiser, x, tile="auto", overlap=0.0) for x in noisy]
    assert _seam_ratio(blended, 16, 0.25, cell) <= 1.0
    assert _seam_ratio(hard, 16, 0.0, cell) > 1.5  # the measure does see seams where tiles are not blended


def test_corrupted_training_is_scored_on_the_clean_image(tmp_path):
    """With every pixel masked the input is black; only a loss on the clean image can teach the colour back."""
    from vaetool.training.trainer import train

    colour = (200, 150, 100)
    (tmp_path / "data").mkdir()
    for k in range(320):  # 20 steps an epoch: few end-of-epoch saves
        Image.new("RGB", (16, 16), colour).save(tmp_path / "data" / f"{k:03d}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train([tmp_path / "data"], tmp_path / "run", device="cpu", detect_channels=False,
                       model_config=ModelConfig(image_size=16, widths=(8, 16), latent_dim=4),
                       train_config=TrainConfig(steps=60, batch_size=16, seed=0, val_fraction=0.0, log_every=20,
                                                corruptions=(Corruption.parse("mask:1"),)))
    finally:
        torch.set_num_threads(threads)
    model = load_model(result.checkpoint).model
    out = model.reconstruct(torch.zeros(1, 3, 16, 16))[0].mean(dim=(1, 2))  # (3,)
    torch.testing.assert_close(out, torch.tensor(colour) / 255.0, atol=0.08, rtol=0)


# ------------------------------------------------------------------------------- spatial and hierarchical models

ANY_SIZE = {kind: config for kind, config in tiny_families().items() if kind != "vector"}
_any_size = tiny_model


@pytest.mark.parametrize("kind", list(ANY_SIZE))
def test_an_any_size_model_denoises_odd_sized_images_whole(kind, tmp_path):
    from vaetool.inference.tiling import pad_to

    model = _any_size(kind)
    path = save_model(tmp_path / "m.safetensors", model)
    folder = tmp_path / "in"
    make_blobs(folder, count=2, size=37, seed=1)
    make_blobs(folder / "gray", count=1, size=9, seed=2, mode="L")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(21, 30, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    (tmp_path / "in" / "deep").mkdir()
    values = _sixteen_bit_png(folder / "deep" / "d.png", 3)  # 18 x 20
    summary = denoise_files(path, [folder], tmp_path / "out", batch_size=4, device="cpu")
    assert len(summary.written) == 5 and not summary.failed
    m = model.size_multiple
    for source in find_images([folder]):
        image = read_image(source.path)
        got = read_image(tmp_path / "out" / source.relative)
        assert got.pixels.shape == image.pixels.shape and got.bit_depth == image.bit_depth
        c, h, w = image.pixels.shape
        x = pad_to(image.pixels, -(-h // m) * m, -(-w // m) * m)[None].expand(1, 3, -1, -1)
        expected = model.reconstruct(x)[0, :, :h, :w]
        expected = (0.299 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2])[None] if c == 1 else expected
        assert (got.pixels - expected).abs().max() <= 1 / 255 + 1e-5, source.relative  # whole, never resized
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "alpha.png"))[..., 3],
                          np.asarray(Image.open(folder / "alpha.png"))[..., 3])
    assert np.asarray(Image.open(tmp_path / "out" / "deep" / "d.png")).shape == values.shape


def test_same_sized_images_share_a_batch_and_other_sizes_run_alone():
    from vaetool.inference.denoise import _Batcher, _Job

    shapes = []

    def run(batch, keys):
        assert len(keys) == len(batch)
        shapes.append(tuple(batch.shape))
        return batch

    batcher = _Batcher(run, lambda shape: 3)
    finished = []
    for size in (8, 8, 12, 8, 8, 8, 8):
        inputs = torch.zeros(1, 3, size, size)
        layout = split_image(torch.zeros(3, size, size), model_size=16, model_channels=3, tile=None, multiple=4)[1]
        finished += batcher.add(_Job(None, None, layout, inputs))
    finished += batcher.flush()
    assert len(finished) == 7
    assert [s[:3] + (s[3],) for s in shapes] == [(2, 3, 8, 8), (1, 3, 12, 12), (3, 3, 8, 8), (1, 3, 8, 8)]
