"""`vaetool.load(...).denoise`, `.eval` and `vaetool.save_images`: the commands' work from Python."""

from __future__ import annotations

import pytest
import torch

import vaetool
from conftest import make_blobs


@pytest.fixture
def model(ckpt):
    return vaetool.load(ckpt, device="cpu")


def test_denoise_keeps_each_image_size_and_matches_the_command_path(model, tmp_path):
    image = torch.rand(3, 40, 24, generator=torch.Generator().manual_seed(0))
    one = model.denoise(image)
    assert one.shape == (3, 40, 24) and 0 <= float(one.min()) and float(one.max()) <= 1
    batch = model.denoise(torch.stack([image, image]))
    torch.testing.assert_close(batch[1], one)
    path = make_blobs(tmp_path / "in", count=1, size=20)[0]
    assert model.denoise(path).shape == (3, 20, 20)


def test_eval_gives_the_command_figures(model, tmp_path):
    make_blobs(tmp_path / "data", count=4)
    figures = model.eval(tmp_path / "data", iw_samples=2)
    assert figures["images"] == 4 and {"neg_elbo", "iwae_nll", "bits_per_dim", "psnr", "ssim"} <= set(figures)
    assert figures == model.eval(tmp_path / "data", iw_samples=2)  # seeded


def test_save_images_writes_atomically_and_refuses_overwrite(model, tmp_path):
    images = model.sample(3, seed=0)
    paths = vaetool.save_images(images, tmp_path / "out")
    assert [p.name for p in paths] == ["image_00000.png", "image_00001.png", "image_00002.png"]
    from vaetool.errors import OutputError

    with pytest.raises(OutputError):
        vaetool.save_images(images, tmp_path / "out")
    named = vaetool.save_images(images[0], [tmp_path / "one.jpg"])
    assert named[0].is_file()
