"""Checkpoints and latents files written by vaetool 0.x before the model families still load and give the same outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vaetool.checkpoint import load_model
from vaetool.io.latents import load_latents

DATA = Path(__file__).parent / "data"


def test_a_vector_checkpoint_without_a_kind_loads_and_gives_the_same_outputs():
    loaded = load_model(DATA / "legacy_vector.safetensors")
    expected = load_file(str(DATA / "legacy_expected.safetensors"))
    assert loaded.config.kind == "vector" and loaded.identity == "033608705984a82c"
    model = loaded.model.eval()
    with torch.no_grad():
        posterior = model.encode(expected["x"])
        recon = model.mean_image(model.decode(posterior.mu))
    torch.testing.assert_close(posterior.mu, expected["mu"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(posterior.logvar, expected["logvar"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon, expected["recon"], rtol=1e-5, atol=1e-6)


def test_an_old_latents_file_loads_with_its_names_and_decodes_the_same():
    latents = load_latents(DATA / "legacy_latents.safetensors")
    expected = load_file(str(DATA / "legacy_expected.safetensors"))
    assert latents.names == ["a.png", "b.png", "sub/c.png"]
    torch.testing.assert_close(latents.values, expected["mu"])
    model = load_model(DATA / "legacy_vector.safetensors").model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.mean_image(model.decode(latents.values)), expected["recon"], rtol=1e-5, atol=1e-6)
