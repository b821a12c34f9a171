"""The Wiener step of denoising: its filter, when it is taken, and the denoise command and API with it."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from conftest import make_blobs
from vaetool.checkpoint import save_model
from vaetool.config import Corruption, ModelConfig, TrainConfig
from vaetool.errors import ConfigError
from vaetool.events import Started
from vaetool.inference import blockmatch, wiener
from vaetool.inference.denoise import denoise_files
from vaetool.inference.transforms import haar_basis
from vaetool.inference.wiener import WienerStep, choose_wiener, dct_basis, wiener_step
from vaetool.io.decode import read_image


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).pow(2).mean()))


def _scene(channels: int = 3, height: int = 48, width: int = 40) -> torch.Tensor:
    """Edges, a ramp and a sine: detail a smooth pilot lacks, on a clean image in [0.1, 0.9]."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    layers = [(x > width // 3).float() * 0.6 + 0.2, ((x - y).abs() < 7).float() * 0.5 + 0.3,
              0.5 + 0.3 * torch.sin(x / 3.0 + y / 5.0)]
    return torch.stack(layers[:channels])


def _noisy(clean: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return clean + sigma * noise  # unclipped: white Gaussian noise, as the filter assumes


def test_the_transforms_are_orthonormal():
    basis = dct_basis(8)
    torch.testing.assert_close(basis @ basis.T, torch.eye(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(wiener.OPPONENT @ wiener.OPPONENT.T, torch.eye(3), atol=1e-6, rtol=0)
    for size in (1, 2, 8, 16):
        haar = haar_basis(size)
        torch.testing.assert_close(haar @ haar.T, torch.eye(size), atol=1e-6, rtol=0)


@pytest.mark.parametrize("matching", [True, False])
@pytest.mark.parametrize("shape", [(3, 48, 40), (1, 37, 53), (3, 5, 9), (1, 1, 1), (3, 301, 17)])
def test_a_pilot_with_signal_everywhere_gives_the_noisy_image_back(shape, matching):
    """Gain 1 in every coefficient: the transforms, their inverses and the aggregation are exact at any size."""
    noisy = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    out = wiener_step(noisy, noisy, 1e-6, strides=(2,), matching=matching, blend=False)  # a blend: the pilot
    assert out.shape == shape
    torch.testing.assert_close(out, noisy, atol=2e-4, rtol=0)  # float32 sums of weights near 1e12


def test_bands_of_rows_give_the_whole_image_result(monkeypatch):
    clean = _scene(height=70)
    # A pilot without exact copies of a block: among equally near blocks which one is stacked is arbitrary.
    jitter = 1e-3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    noisy, pilot = _noisy(clean, 0.1), clean.flip(-1) + jitter
    whole = wiener_step(noisy, pilot, 0.1)
    monkeypatch.setattr(wiener, "BAND_ROWS", 8)  # several bands, and a pass's coefficients recomputed
    monkeypatch.setattr(blockmatch, "BAND_NUMBERS", 5000)  # one row of references a band
    torch.testing.assert_close(wiener_step(noisy, pilot, 0.1), whole, atol=1e-5, rtol=0)
    monkeypatch.setattr(blockmatch, "BAND_NUMBERS", 2 ** 30)
    monkeypatch.setattr(blockmatch, "STACKS_PER_BAND", 40)  # bands of references for the caches' sake
    torch.testing.assert_close(wiener_step(noisy, pilot, 0.1), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(30, 30), (21, 40)])
def test_block_matching_takes_the_nearest_blocks_a_direct_search_finds(size):
    """Against every offset's block distance summed pixel by pixel in float64: the distances of the blocks
    taken are the smallest in the window (ties may be broken either way)."""
    height, width = size
    image = torch.rand(height, width, generator=torch.Generator().manual_seed(7))
    rows, cols = blockmatch.reference_grid(height - 7, 4), blockmatch.reference_grid(width - 7, 4)
    radius, group = 5, 8
    matched = blockmatch.match_blocks(image, rows, cols, group, radius)
    wide = image.double()
    for i, (y, x) in enumerate((int(y), int(x)) for y in rows for x in cols):
        reference = wide[y:y + 8, x:x + 8]
        distances = {(v, u): float((wide[v:v + 8, u:u + 8] - reference).square().sum())
                     for v in range(max(0, y - radius), min(height - 8, y + radius) + 1)
                     for u in range(max(0, x - radius), min(width - 8, x + radius) + 1)}
        taken = [distances[int(p) // width, int(p) % width] for p in matched[i]]
        assert int(matched[i, 0]) == y * width + x  # the reference first
        assert taken[1:] == pytest.approx(sorted(distances.values())[1:group], abs=1e-5)


def test_the_blocks_dct_is_the_same_taken_block_by_block_or_from_every_position():
    images = torch.rand(4, 19, 23, generator=torch.Generator().manual_seed(8))
    at = torch.randint(0, 12 * 16, (50,), generator=torch.Generator().manual_seed(9))
    dense = blockmatch._block_coefficients(images, at, dense=True)
    sparse = blockmatch._block_coefficients(images, at, dense=False)
    assert dense.shape == sparse.shape == (4, 50, 64)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    # The first block's coefficients are its orthonormal DCT.
    y, x = int(at[0]) // 16, int(at[0]) % 16
    block = images[1, y:y + 8, x:x + 8].reshape(64)
    torch.testing.assert_close(sparse[1, 0], dct_basis(8) @ block, atol=1e-5, rtol=0)


def test_block_matching_finds_a_copied_block_and_puts_the_reference_first():
    image = torch.rand(40, 40, generator=torch.Generator().manual_seed(2))
    image[20:28, 25:33] = image[10:18, 12:20]  # the block at (10, 12) again at (20, 25)
    rows, cols = torch.tensor([10]), torch.tensor([12])
    matched = blockmatch.match_blocks(image, rows, cols, group=4, radius=16)
    assert matched.shape == (1, 4)
    assert int(matched[0, 0]) == 10 * 40 + 12 and int(matched[0, 1]) == 20 * 40 + 25
    # Every match lies inside the image and within the search window.
    ys, xs = matched // 40, matched % 40
    assert bool(((ys - 10).abs() <= 16).all() and ((xs - 12).abs() <= 16).all())
    assert bool((ys <= 32).all() and (xs <= 32).all())


@pytest.mark.parametrize("group", [8, 32])
def test_a_group_larger_than_a_small_image_holds_is_cut_to_fit(group):
    """A 15 x 15 padded image (a 1-pixel input) leaves 16 candidate blocks at a corner: the stack stays inside."""
    image = torch.rand(3, 15, 15, generator=torch.Generator().manual_seed(3))
    [[out]] = blockmatch.collaborative_pass([(image, [image])], 1e-6, group=group, radius=8)
    torch.testing.assert_close(out, image, atol=1e-4, rtol=0)


def _strokes(height: int = 64, width: int = 64) -> torch.Tensor:
    """Thin strokes repeated across the image, in colour: detail that similar blocks elsewhere share."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    lines = ((x + 2 * y) % 12 < 3).float() * 0.6 + 0.2
    return torch.stack([lines, 1.0 - lines, 0.5 + 0.3 * (x % 16 < 8).float()])


@pytest.mark.parametrize("sigma", [15 / 255, 25 / 255])
def test_block_matching_recovers_repeated_detail_better_than_blocks_alone(sigma):
    """A pilot that lost the strokes (16 dB): blocks alone cannot tell them from the noise, their matches can."""
    clean = _strokes()
    noisy, smooth = _noisy(clean, sigma), _smooth(clean)
    alone = _psnr(wiener_step(noisy, smooth, sigma, matching=False), clean)
    matched = _psnr(wiener_step(noisy, smooth, sigma), clean)
    assert matched > alone + 1.5, (alone, matched)


def _smooth(clean: torch.Tensor) -> torch.Tensor:
    """A pilot that lost the fine detail, as a model's decode does (28 dB on the scene), with no noise in it."""
    return torch.nn.functional.avg_pool2d(clean[None], 3, stride=1, padding=1, count_include_pad=False)[0]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("sigma", [5 / 255, 15 / 255])
def test_the_step_brings_back_the_detail_a_smooth_pilot_lost(channels, sigma):
    clean = _scene(channels)
    noisy, smooth = _noisy(clean, sigma), _smooth(clean)
    pilot_psnr, noisy_psnr = _psnr(smooth, clean), _psnr(noisy, clean)
    out = wiener_step(noisy, smooth, sigma)
    assert _psnr(out, clean) > max(pilot_psnr, noisy_psnr) + 1.0, (pilot_psnr, noisy_psnr, _psnr(out, clean))


@pytest.mark.parametrize("matching", [True, False])
@pytest.mark.parametrize("sigma", [25 / 255, 50 / 255])
def test_at_high_noise_a_noiseless_pilot_is_kept_by_the_blend(sigma, matching):
    """A pilot far better than the noisy image (here 8-14 dB): the filter alone keeps a share of the noise
    and falls below it; the SURE blend stays near the pilot."""
    clean = _scene()
    noisy, smooth = _noisy(clean, sigma), _smooth(clean)
    filtered = wiener_step(noisy, smooth, sigma, matching=matching, blend=False)
    blended = wiener_step(noisy, smooth, sigma, matching=matching)
    assert _psnr(filtered, clean) < _psnr(smooth, clean) - 0.3  # the premise: the filter alone loses
    assert _psnr(blended, clean) > max(_psnr(filtered, clean), _psnr(smooth, clean) - 1.5)


@pytest.mark.parametrize("sigma", [10 / 255, 30 / 255])
def test_the_sure_blend_is_near_the_best_blend(sigma):
    """SURE is unbiased for a filter linear in the noisy image: with a pilot independent of the noise its
    share is near the one the clean image would choose."""
    from vaetool.inference.wiener import OPPONENT, _wiener_pass, sure_blend

    clean = _scene()
    pilot = _smooth(clean) * 0.9 + 0.05  # off in detail and in contrast
    grid = torch.linspace(0, 1, 101)
    gaps = []
    for seed in range(4):
        noisy = _noisy(clean, sigma, seed)
        n, p, c = (torch.einsum("ij,jhw->ihw", OPPONENT, x) for x in (noisy, pilot, clean))
        pad = (7, 7, 7, 7)
        filtered, diagonal = _wiener_pass(torch.nn.functional.pad(n[None], pad, mode="reflect")[0],
                                          torch.nn.functional.pad(p[None], pad, mode="reflect")[0], sigma, 2, {})
        filtered, trace = filtered[:, 7:-7, 7:-7], float(diagonal[:, 7:-7, 7:-7].sum())
        share = sure_blend(n, p, filtered, trace, sigma)
        errors = torch.stack([(torch.lerp(p, filtered, a) - c).square().sum() for a in grid])
        gaps.append(abs(share - float(grid[errors.argmin()])))
    assert sum(gaps) / len(gaps) < 0.1, gaps


def test_the_sure_blend_counts_a_pilot_that_depends_on_the_noise():
    """A pilot made from the noisy image itself (a 3x3 mean): with its divergence counted the blend's share is
    near the one the clean image would choose; counted as fixed it leans towards the pilot."""
    sigma, clean = 20 / 255, _scene()
    inside = torch.nn.functional.avg_pool2d(torch.ones_like(clean)[None], 3, stride=1, padding=1)[0] * 9
    divergence = float((1.0 / inside).sum())  # the mean's weight on each pixel itself: 1 / its neighbours
    grid = torch.linspace(0, 1, 101)
    gaps = {True: [], False: []}
    for seed in range(4):
        noisy = _noisy(clean, sigma, seed)
        pilot = _smooth(noisy)
        filtered = wiener_step(noisy, pilot, sigma, blend=False)
        errors = torch.stack([(torch.lerp(pilot, filtered, a) - clean).square().sum() for a in grid])
        best = torch.lerp(pilot, filtered, float(grid[errors.argmin()]))
        for counted in (True, False):
            out = wiener_step(noisy, pilot, sigma, pilot_divergence=divergence if counted else 0.0)
            gaps[counted].append(float((out - best).square().mean()))
    assert sum(gaps[True]) < 0.5 * sum(gaps[False]), gaps


def test_the_probe_estimates_a_smoothers_divergence():
    """One +-1 direction and one more pass give the divergence of a 3x3 mean within a few percent (the
    neighbours' terms average out over the pixels); the step moves the image by a tenth of sigma."""
    sigma, clean = 20 / 255, _scene()
    inside = torch.nn.functional.avg_pool2d(torch.ones_like(clean)[None], 3, stride=1, padding=1)[0] * 9
    exact = float((1.0 / inside).sum())
    noisy = _noisy(clean, sigma)
    probe = WienerStep(sigma, "as given").probe(noisy)
    assert probe.sigma == sigma and probe.step == pytest.approx(sigma / 10)
    assert set(probe.direction.unique().tolist()) == {-1.0, 1.0} and probe.direction.shape == noisy.shape
    estimate = probe.divergence(_smooth(noisy), _smooth(probe.moved(noisy)))
    assert estimate == pytest.approx(exact, rel=0.1)
    assert WienerStep(sigma, "as given", divergence=False).probe(noisy) is None
    assert WienerStep(None, "estimated").probe(clean * 0 + 0.5) is None  # no noise: no step to take


def test_the_step_takes_the_moved_estimate_only_when_given_it():
    sigma, clean = 20 / 255, _scene()
    noisy = _noisy(clean, sigma)
    step, pilot = WienerStep(sigma, "as given"), _smooth(noisy)
    probe = step.probe(noisy)
    moved = _smooth(probe.moved(noisy))
    expected = wiener_step(noisy, pilot, sigma, moved=wiener.Moved(probe.direction, probe.step, moved))
    torch.testing.assert_close(step(noisy, pilot, probe, moved), expected)
    assert torch.equal(step(noisy, pilot), wiener_step(noisy, pilot, sigma))


@pytest.mark.parametrize("matching", [True, False])
@pytest.mark.parametrize("k", [1.0, 0.25])
def test_monte_carlo_sure_blends_near_the_best_blend_for_weak_and_strong_pilots(k, matching):
    """Pilots made from the noisy image (its 3x3 mean, and the same k times nearer the clean image): the blend
    whose risk counts both divergences by the moved image is nearer the best share (chosen with the clean
    image) than the pilot counted as fixed, and than the pilot's divergence alone, which leans to the filter
    when the pilot is strong."""
    sigma, clean = 20 / 255, _scene(height=48, width=48)
    grid = torch.linspace(0, 1, 101)
    gaps = {"monte carlo": [], "fixed": [], "pilot only": []}
    step = WienerStep(sigma, "as given")

    def model(image: torch.Tensor) -> torch.Tensor:
        return clean + k * (_smooth(image) - clean)

    for seed in range(3):
        noisy = _noisy(clean, sigma, seed)
        pilot, probe = model(noisy), step.probe(noisy)
        moved = model(probe.moved(noisy))
        filtered = wiener_step(noisy, pilot, sigma, matching=matching, blend=False)
        errors = torch.stack([(torch.lerp(pilot, filtered, a) - clean).square().sum() for a in grid])
        best = torch.lerp(pilot, filtered, float(grid[errors.argmin()])).clamp(0, 1)
        outputs = {"monte carlo": wiener_step(noisy, pilot, sigma, matching=matching,
                                              moved=wiener.Moved(probe.direction, probe.step, moved)),
                   "fixed": wiener_step(noisy, pilot, sigma, matching=matching),
                   "pilot only": wiener_step(noisy, pilot, sigma, matching=matching,
                                             pilot_divergence=probe.divergence(pilot, moved))}
        for name, out in outputs.items():
            gaps[name].append(float((out - best).square().mean()))
    total = {name: sum(values) for name, values in gaps.items()}
    # Each of the other two is right for one kind of pilot only, and ten times further off for the other.
    assert total["monte carlo"] < 0.1 * max(total["fixed"], total["pilot only"]), total


def test_a_strong_pilot_goes_to_the_collaborative_pass_without_the_blockwise_passes_blur():
    """A pilot nearer the clean image than what the blockwise passes make of it (its noise-free smoothing, moved
    half way to the clean image: 33.6 dB against their 31.5): with `sure_pilot` the collaborative pass takes
    the pilot rather than their output, and ends nearer the clean image. A weak pilot (the smoothing alone,
    27.6 dB against their 29.9) still gets their output, and loses nothing."""
    sigma, clean = 15 / 255, _scene(height=48, width=48)
    step = WienerStep(sigma, "as given")
    for k, gain in ((0.5, 0.98), (1.0, 1.001)):
        def model(image: torch.Tensor) -> torch.Tensor:
            return clean + k * (_smooth(image) - clean)

        errors = {True: 0.0, False: 0.0}
        for seed in range(3):
            noisy = _noisy(clean, sigma, seed)
            probe = step.probe(noisy)
            moved = wiener.Moved(probe.direction, probe.step, model(probe.moved(noisy)))
            for flag in errors:
                out = wiener_step(noisy, model(noisy), sigma, moved=moved, sure_pilot=flag)
                errors[flag] += float((out - clean).square().mean())
        assert errors[True] < gain * errors[False], (k, errors)


def test_an_oracle_pilot_removes_most_of_the_noise():
    clean = _scene()
    noisy = _noisy(clean, 0.1)
    for matching in (True, False):
        out = wiener_step(noisy, clean, 0.1, strides=(2,), matching=matching, blend=False)
        assert _psnr(out, clean) > _psnr(noisy, clean) + 8.0


def test_no_noise_leaves_the_image_alone():
    image = _scene()
    assert torch.equal(wiener_step(image, image * 0, 0.0), image)


# ------------------------------------------------------------------------------- when the step is taken


def _config(**changes) -> ModelConfig:
    return ModelConfig(image_size=16, latent_dim=4, widths=(8, 16), **changes)


GAUSSIAN = (Corruption.parse("gaussian:0.05-0.2"),)


def test_a_gaussian_denoiser_takes_the_step_with_the_sigma_estimated_per_image():
    step = choose_wiener(None, None, _config(), GAUSSIAN)
    assert step == WienerStep(None, "estimated from each image")


def test_a_noise_model_gives_its_own_sigma_and_a_given_sigma_wins():
    config = _config(noise_model="gaussian", noise_sigma=0.08)
    assert choose_wiener(None, None, config, ()).sigma == 0.08
    assert choose_wiener(None, 0.02, config, ()).sigma == 0.02


@pytest.mark.parametrize("corruptions", [(), None, (Corruption.parse("mask:0.3"),),
                                         (Corruption.parse("gaussian:0.1"), Corruption.parse("saltpepper:0.05"))])
def test_models_not_trained_on_gaussian_noise_alone_skip_it_unless_asked(corruptions):
    assert choose_wiener(None, None, _config(), corruptions) is None
    assert choose_wiener(True, None, _config(), corruptions) is not None
    assert choose_wiener(False, None, _config(), GAUSSIAN) is None


def test_the_estimated_sigma_follows_each_image():
    clean = _scene(height=64, width=64)
    step = WienerStep(None, "estimated from each image")
    for sigma in (0.04, 0.15):
        noisy = _noisy(clean, sigma)
        expected = wiener_step(noisy, clean, sigma)
        assert _psnr(step(noisy, clean), expected) > 30.0  # the estimate is within a few percent


# ------------------------------------------------------------------------------- the command and the API


@pytest.fixture
def gaussian_denoiser(tmp_path):
    from vaetool.models.vector import VAE

    torch.manual_seed(0)
    model = VAE(_config()).eval()
    return save_model(tmp_path / "dn.safetensors", model, train_config=TrainConfig(corruptions=GAUSSIAN))


def _denoise(checkpoint, folder, out, **options):
    events = []
    outcome = denoise_files(checkpoint, [folder], out, device="cpu", callback=events.append, **options)
    assert len(outcome.written) == len(list(folder.iterdir())) and not outcome.failed
    started = next(e for e in events if isinstance(e, Started))
    return {p.name: read_image(p).pixels for p in sorted(out.iterdir())}, started.info["wiener"]


def test_denoise_takes_the_step_for_a_gaussian_denoiser_and_says_so(tmp_path, gaussian_denoiser):
    make_blobs(tmp_path / "in", count=2, size=24)
    with_step, said = _denoise(gaussian_denoiser, tmp_path / "in", tmp_path / "a")
    without, said_off = _denoise(gaussian_denoiser, tmp_path / "in", tmp_path / "b", wiener=False)
    given, said_given = _denoise(gaussian_denoiser, tmp_path / "in", tmp_path / "c", sigma=25 / 255)
    _, said_blockwise = _denoise(gaussian_denoiser, tmp_path / "in", tmp_path / "d", block_matching=False)
    assert said == "on, with block matching, Monte-Carlo SURE blend, noise sigma estimated from each image"
    assert said_off == "off"
    assert said_given == "on, with block matching, Monte-Carlo SURE blend, noise sigma 25/255 (as given)"
    assert said_blockwise == "on, blockwise only, Monte-Carlo SURE blend, noise sigma estimated from each image"
    for name, image in with_step.items():
        original = read_image(tmp_path / "in" / name).pixels
        # A clean input has almost no noise: the step gives nearly the input back, the bare model a blur.
        assert _psnr(image, original) > _psnr(without[name], original) + 5.0
        assert not torch.equal(image, given[name])
    # On noisy inputs the collaborative pass changes the output (on clean ones the estimated sigma is ~0).
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for i, path in enumerate(sorted((tmp_path / "in").iterdir())):
        pixels = read_image(path).pixels
        pixels = pixels + 0.05 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(i))
        Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(noisy / path.name)
    matched, _ = _denoise(gaussian_denoiser, noisy, tmp_path / "e")
    blockwise, _ = _denoise(gaussian_denoiser, noisy, tmp_path / "f", block_matching=False)
    assert all(not torch.equal(matched[name], blockwise[name]) for name in matched)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_a_sigma_out_of_range_is_refused_before_any_output(tmp_path, gaussian_denoiser, sigma):
    make_blobs(tmp_path / "in", count=1, size=16)
    with pytest.raises(ConfigError, match="--sigma"):
        denoise_files(gaussian_denoiser, [tmp_path / "in"], tmp_path / "out", device="cpu", sigma=sigma)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_api_denoises_with_the_step_as_the_command_does(tmp_path, gaussian_denoiser):
    import vaetool

    make_blobs(tmp_path / "in", count=1, size=24)
    files, _ = _denoise(gaussian_denoiser, tmp_path / "in", tmp_path / "out", samples=0)  # the API's default
    model = vaetool.load(gaussian_denoiser, device="cpu")
    image = tmp_path / "in" / next(iter(files))
    got = model.denoise(image)
    assert (got - files[image.name]).abs().max() <= 1 / 255 + 1e-6
    assert not torch.allclose(got, model.denoise(image, wiener=False), atol=1e-3)
    blockwise, _ = _denoise(gaussian_denoiser, tmp_path / "in", tmp_path / "blockwise", samples=0, block_matching=False)
    got = model.denoise(image, block_matching=False)
    assert (got - blockwise[image.name]).abs().max() <= 1 / 255 + 1e-6


def test_the_folder_pipeline_gives_the_step_the_models_estimate_of_the_moved_image(tmp_path, gaussian_denoiser,
                                                                                 monkeypatch):
    """Each image's moved copy goes through the model with it (in the same batches), and the step gets both
    estimates: the same as the model gives each alone; a plausible clean version (--diverse) gets no step."""
    from vaetool.checkpoint import load_model
    from vaetool.inference.tiledenoise import denoise_image

    make_blobs(tmp_path / "in", count=3, size=24)
    make_blobs(tmp_path / "in" / "odd", count=1, size=37, seed=4)  # tiles of a fixed-size model
    seen = []
    original = WienerStep.__call__

    def spy(self, noisy, pilot, probe=None, moved_pilot=None):
        seen.append((noisy, pilot, probe, moved_pilot))
        return original(self, noisy, pilot, probe, moved_pilot)

    monkeypatch.setattr(WienerStep, "__call__", spy)
    outcome = denoise_files(gaussian_denoiser, [tmp_path / "in"], tmp_path / "out", device="cpu", batch_size=3,
                            diverse=1, diverse_dir=tmp_path / "versions", sigma=25 / 255)
    assert len(outcome.written) == 8 and not outcome.failed
    assert len(seen) == 4  # the four clean estimates; the four versions are the model's own draws
    model = load_model(gaussian_denoiser).model
    for noisy, pilot, probe, moved_pilot in seen:
        assert probe is not None and moved_pilot is not None
        torch.testing.assert_close(pilot, denoise_image(model, noisy), atol=1e-5, rtol=0)
        torch.testing.assert_close(moved_pilot, denoise_image(model, probe.moved(noisy)), atol=1e-5, rtol=0)


def test_the_installed_command_takes_wiener_options(tmp_path, gaussian_denoiser):
    from typer.testing import CliRunner

    from vaetool.cli.app import app

    make_blobs(tmp_path / "in", count=1, size=16)
    outputs = {}
    choices = {"default": [], "given": ["--sigma", "25"], "off": ["--no-wiener"], "blockwise": ["--no-block-matching"]}
    for name, options in choices.items():
        result = CliRunner().invoke(app, ["denoise", str(gaussian_denoiser), str(tmp_path / "in"), "-o",
                                          str(tmp_path / name), "--device", "cpu", "-q", *options])
        assert result.exit_code == 0, result.output
        written = next((tmp_path / name).iterdir())
        assert result.stdout.split() == [str(written)]  # stdout: the written paths only
        outputs[name] = read_image(written).pixels
    # --sigma 25 differs from the sigma estimated on a clean image, and both from no step at all.
    assert not torch.equal(outputs["default"], outputs["given"])
    assert not torch.equal(outputs["default"], outputs["off"]) and not torch.equal(outputs["given"], outputs["off"])
    assert not torch.equal(outputs["default"], outputs["blockwise"])
    assert math.isfinite(float(outputs["given"].sum()))
    bad = CliRunner().invoke(app, ["denoise", str(gaussian_denoiser), str(tmp_path / "in"), "-o",
                                   str(tmp_path / "bad"), "--device", "cpu", "--sigma", "300"])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1 and "--sigma" in bad.output
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
