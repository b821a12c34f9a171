"""Short runs stay stable: a posterior variance pushed far above the prior's cannot blow the KL up."""

from __future__ import annotations

import json
import math

import torch

from vaetool.config import ModelConfig, TrainConfig
from vaetool.models.base import DiagonalGaussian
from vaetool.training import trainer

TINY = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))
KL_CAP = 0.5 * (math.exp(2.0) - 1.0 - 2.0)  # the KL of one element at the top of the logvar range


def test_the_kl_of_a_huge_logvar_stays_small():
    q = DiagonalGaussian(torch.zeros(1, 4), torch.full((1, 4), 20.0))  # what Adam's head steps reached
    assert float(q.kl()) <= 4 * KL_CAP + 1e-5


def test_training_recovers_from_a_logvar_head_pushed_to_twenty(blob_folder, tmp_path, monkeypatch):
    """The failure seen in short runs: the logvar head's output jumped to the clamp. The KL stays bounded."""
    real = trainer.build_model

    def pushed(config):
        model = real(config)
        with torch.no_grad():
            model.encoder.head.bias[config.latent_dim:] = 20.0  # (D,) logvar half of the head
        return model

    monkeypatch.setattr(trainer, "build_model", pushed)
    config = TrainConfig(steps=5, batch_size=2, val_fraction=0.2, seed=3, log_every=1)
    trainer.train([blob_folder], tmp_path / "r", model_config=TINY, train_config=config, device="cpu",
                  cache_dir=None, report=False)
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_kl"] < 100  # the mean terms add a little; with logvar at 20 it would be 4.8e8 nats
    assert math.isfinite(row["val_neg_elbo"])


def test_a_kl_spike_is_told_and_ordinary_epochs_are_not():
    from vaetool.training.epoch import kl_spike

    assert kl_spike([50.0, 40.0, 35.0], 30.0, epoch=4) is None  # progress
    assert kl_spike([50.0, 40.0], 5000.0, epoch=3) is None  # too little history to judge
    message = kl_spike([50.0, 40.0, 35.0, 33.0], 1.2e6, epoch=5)
    assert message.startswith("epoch 5: the KL jumped to 1.2e+06") and "--lr" in message
