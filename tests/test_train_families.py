"""The trainer works with any model family: latent shapes, per-level KL metrics, grids from the family's prior."""

from __future__ import annotations

import json

import torch

from vaetool.checkpoint import load_model
from vaetool.config import ModelConfig, TrainConfig
from vaetool.events import Progress
from vaetool.models.base import FAMILIES, DiagonalGaussian, FactorizedPosterior, ModelOutput, register
from vaetool.models.vector import VAE
from vaetool.training.trainer import train


class TwoLevels(VAE):
    """The vector VAE with its latent cut in two named levels, "top" (first 2 dims) and "rest": a two-level family."""

    kind = "two-levels-test"

    def encode(self, x: torch.Tensor) -> FactorizedPosterior:
        q = self.encoder(x * 2.0 - 1.0)
        return FactorizedPosterior({"top": DiagonalGaussian(q.mu[:, :2], q.logvar[:, :2]),
                                    "rest": DiagonalGaussian(q.mu[:, 2:], q.logvar[:, 2:])})

    def decode(self, latents):
        return self.decoder(torch.cat([latents["top"], latents["rest"]], dim=1))

    def forward(self, x, *, sample=True, noise=None, generator=None) -> ModelOutput:
        posterior = self.encode(x)
        latents = posterior.sample(generator, noise=noise) if sample else posterior.mode()
        return ModelOutput(latents, self.decode(latents), posterior.kl_terms(), posterior)

    def latent_shapes(self, height, width):
        return {"top": (2,), "rest": (self.config.latent_dim - 2,)}

    def sample_prior(self, count, *, temperature=1.0, generator=None, size=None):
        z = torch.randn(count, self.config.latent_dim, generator=generator)
        return {"top": z[:, :2], "rest": z[:, 2:]}


def test_a_two_level_family_logs_each_levels_kl(blob_folder, tmp_path):
    register(TwoLevels)
    try:
        config = ModelConfig(kind=TwoLevels.kind, image_size=16, latent_dim=4, widths=(8, 16))
        seen = []
        train([blob_folder], tmp_path / "r", model_config=config, device="cpu", cache_dir=None, report=False,
              train_config=TrainConfig(steps=4, batch_size=2, val_fraction=0.2, log_every=1),
              callback=lambda e: seen.append(e.metrics) if isinstance(e, Progress) and e.metrics else None)
        assert all(m["kl"] == m["kl_top"] + m["kl_rest"] or abs(m["kl"] - m["kl_top"] - m["kl_rest"]) < 1e-6 * m["kl"]
                   for m in seen)
        row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
        assert abs(row["train_kl"] - row["train_kl_top"] - row["train_kl_rest"]) < 1e-6 * row["train_kl"]
        assert (tmp_path / "r" / "samples.png").is_file() and load_model(tmp_path / "r").config.kind == TwoLevels.kind
    finally:
        FAMILIES.pop(TwoLevels.kind, None)


def test_one_level_has_no_per_level_metrics(blob_folder, tmp_path):
    train([blob_folder], tmp_path / "r", model_config=ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)),
          train_config=TrainConfig(steps=2, batch_size=2, val_fraction=0.2), device="cpu", cache_dir=None,
          report=False)
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert not [k for k in row if k.startswith("train_kl_")]
