"""The trainer works with any model family: latent shapes, per-level KL metrics, grids from the family's prior."""

from __future__ import annotations

import json

import torch

from vaetool.checkpoint import load_model
from vaetool.config import ModelConfig, TrainConfig
from vaetool.events import Progress
from vaetool.training.trainer import train


HIERARCHICAL = ModelConfig(kind="hierarchical", image_size=16, latent_dim=4, widths=(8, 16), latent_channels=2,
                           downsample=2)
SPATIAL = ModelConfig(kind="spatial", image_size=16, widths=(8, 16), latent_channels=2, downsample=4)


def test_a_hierarchical_run_logs_each_levels_kl_and_its_checkpoint_loads(blob_folder, tmp_path):
    seen = []
    train([blob_folder], tmp_path / "r", model_config=HIERARCHICAL, device="cpu", cache_dir=None, report=False,
          train_config=TrainConfig(steps=4, batch_size=2, val_fraction=0.2, log_every=1),
          callback=lambda e: seen.append(e.metrics) if isinstance(e, Progress) and e.metrics else None)
    levels = [k for k in seen[-1] if k.startswith("kl_")]
    assert len(levels) >= 2 and "kl_top" in levels
    for m in seen:
        assert abs(m["kl"] - sum(m[k] for k in levels)) <= 1e-5 * max(1.0, abs(m["kl"]))
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(row["train_kl"] - sum(row[f"train_{k}"] for k in levels)) <= 1e-5 * max(1.0, abs(row["train_kl"]))
    assert (tmp_path / "r" / "samples.png").is_file() and load_model(tmp_path / "r").config.kind == "hierarchical"


def test_every_family_resumes_to_the_same_weights(blob_folder, tmp_path):
    for name, config in (("spatial", SPATIAL), ("hierarchical", HIERARCHICAL)):
        args = dict(model_config=config, device="cpu", cache_dir=None, report=False)
        cfg = TrainConfig(steps=6, batch_size=2, val_fraction=0.2, lr_schedule="constant")
        train([blob_folder], tmp_path / f"{name}-whole", train_config=cfg, **args)
        train([blob_folder], tmp_path / f"{name}-cut", train_config=TrainConfig(steps=3, batch_size=2, val_fraction=0.2,
                                                                               lr_schedule="constant"), **args)
        train([blob_folder], tmp_path / f"{name}-cut", train_config=cfg, resume=True, **args)
        whole = load_model(tmp_path / f"{name}-whole" / "last.safetensors").model.state_dict()
        cut = load_model(tmp_path / f"{name}-cut" / "last.safetensors").model.state_dict()
        assert whole.keys() == cut.keys()
        for key in whole:
            torch.testing.assert_close(whole[key], cut[key], msg=f"{name}: {key}")


def test_one_level_has_no_per_level_metrics(blob_folder, tmp_path):
    train([blob_folder], tmp_path / "r", model_config=ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)),
          train_config=TrainConfig(steps=2, batch_size=2, val_fraction=0.2), device="cpu", cache_dir=None,
          report=False)
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert not [k for k in row if k.startswith("train_kl_")]
