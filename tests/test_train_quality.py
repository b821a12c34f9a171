"""Training's quality bookkeeping: per-epoch validation metrics, best vs last checkpoint, early stopping, EMA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vaetool.checkpoint import load_model
from vaetool.config import ModelConfig, TrainConfig
from vaetool.inference.evaluate import evaluate
from vaetool.models.vector import VAE
from vaetool.training import trainer as train_module
from vaetool.training.trainer import train

SEED, VAL_FRACTION = 3, 0.25  # 12 images: 9 to train (4 steps of 2 per epoch), 3 to validate
TINY = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))


def run(data: Path, out: Path, *, model_config: ModelConfig = TINY, **train_kw):
    config = TrainConfig(batch_size=2, val_fraction=VAL_FRACTION, seed=SEED, log_every=1, **train_kw)
    return train([data], out, model_config=model_config, train_config=config, device="cpu", cache_dir=None)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validation_files(folder: Path) -> list[Path]:
    """The files train() holds out: its split is a seeded permutation of the sorted file list."""
    files = sorted(folder.glob("*.png"))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SEED))
    return [files[i] for i in order[: int(len(files) * VAL_FRACTION)]]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).model.state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_jsonl_has_validation_elbo_and_psnr_per_epoch(blob_folder, tmp_path):
    result = run(blob_folder, tmp_path / "run", model_config=TINY, epochs=3, lr=0.01, patience=1)
    lines = metrics(tmp_path / "run")
    assert result.stopped == "budget"  # every epoch improved, so patience 1 never fired
    assert [line["epoch"] for line in lines] == [1, 2, 3] and all(line["best"] for line in lines)
    assert [line["step"] for line in lines] == [4, 8, 12]
    for line in lines:
        for key in ("train_loss", "train_recon", "train_kl", "train_neg_elbo", "val_neg_elbo", "val_recon",
                    "val_kl", "val_psnr", "best", "elapsed", "decoder_log_scale"):
            assert key in line, key
        assert not line["partial"] and math.isfinite(line["val_neg_elbo"]) and line["val_psnr"] > 0
        assert line["val_neg_elbo"] == pytest.approx(line["val_recon"] + line["val_kl"])
    # The deterministic parts agree with an independent evaluation of the saved weights on the held-out files.
    last = lines[-1]
    result = evaluate(tmp_path / "run" / "last.safetensors", validation_files(blob_folder), iw_samples=1,
                      device="cpu")
    assert result.images == 3
    assert result.kl == pytest.approx(last["val_kl"], rel=1e-4)
    assert result.psnr == pytest.approx(last["val_psnr"], rel=1e-4)


def script_validation(monkeypatch, scores: list[float] | list[tuple[float, float]]) -> None:
    """Make epoch i's validation -ELBO scores[i], or its (recon, KL) pair (the PSNR stays real), so best and worse
    epochs are known."""
    real, calls = train_module.validate, []

    def scripted(*args, **kwargs):
        metrics = real(*args, **kwargs)
        score = scores[len(calls) % len(scores)]  # once per epoch; a second run starts over
        recon, kl = score if isinstance(score, tuple) else (score, 0.0)
        metrics.update(val_recon=recon, val_kl=kl, val_neg_elbo=recon + kl,
                       val_objective=recon + kwargs["beta"] * kl)
        calls.append(1)
        return metrics

    monkeypatch.setattr(train_module, "validate", scripted)


def test_best_checkpoint_is_the_best_validation_epoch_and_last_is_the_last(blob_folder, tmp_path, monkeypatch):
    script_validation(monkeypatch, [50.0, 30.0, 40.0, 35.0])
    # A constant rate, so that a 2-epoch budget follows the same path as the first 2 epochs of 4.
    run(blob_folder, tmp_path / "run", model_config=TINY, epochs=4, lr=0.01, lr_schedule="constant")
    lines = metrics(tmp_path / "run")
    assert [line["best"] for line in lines] == [True, True, False, False]
    best = load_model(tmp_path / "run" / "model.safetensors").training["metrics"]
    last = load_model(tmp_path / "run" / "last.safetensors").training["metrics"]
    assert best["epoch"] == 2 and best["val_neg_elbo"] == 30.0
    assert last["epoch"] == 4 and last == lines[-1]
    best_weights = state_dict(tmp_path / "run" / "model.safetensors")
    assert not same_weights(best_weights, state_dict(tmp_path / "run" / "last.safetensors"))
    # The same seed stopped after epoch 2 reaches exactly the weights kept as the best.
    run(blob_folder, tmp_path / "short", model_config=TINY, epochs=2, lr=0.01, lr_schedule="constant")
    assert same_weights(best_weights, state_dict(tmp_path / "short" / "last.safetensors"))


def test_with_a_kl_weight_the_best_checkpoint_is_the_best_at_the_weighted_objective(blob_folder, tmp_path,
                                                                                      monkeypatch):
    # (recon, KL) per epoch: by the -ELBO epoch 1 is best (10 < 50 and 30), by recon + 0.1 KL epoch 2 (5 < 10, 8).
    script_validation(monkeypatch, [(10.0, 0.0), (0.0, 50.0), (5.0, 30.0)])
    result = run(blob_folder, tmp_path / "run", model_config=TINY, epochs=3, lr=0.01, beta=0.1)
    lines = metrics(tmp_path / "run")
    assert [line["best"] for line in lines] == [True, True, False]
    assert load_model(tmp_path / "run" / "model.safetensors").training["metrics"]["epoch"] == 2
    # What the run reports of its best epoch is still that epoch's -ELBO.
    assert result.best_epoch == 2 and result.best_val_neg_elbo == 50.0


def test_a_denoiser_is_validated_on_corrupted_inputs_against_the_clean_images():
    from vaetool.config import Corruption
    from vaetool.training.corrupt import corrupt, step_generator
    from vaetool.training.distributed import World
    from vaetool.training.epoch import validate

    torch.manual_seed(0)
    model = VAE(TINY)
    pixels = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    noise = (Corruption("gaussian", 0.3, 0.3),)
    kw = dict(batch=4, seed=1, device=torch.device("cpu"), world=World())
    clean = validate(model, pixels, torch.arange(6), **kw)
    noisy = validate(model, pixels, torch.arange(6), corruptions=noise, **kw)
    assert noisy["val_psnr"] != clean["val_psnr"]
    # The PSNR is of the model's output from the corrupted images, scored against the clean ones.
    want = []
    with torch.no_grad():
        for k, start in enumerate(range(0, 6, 4)):
            x = pixels[start: start + 4].float() / 255
            seen = corrupt(x, noise, generator=step_generator(1, k, torch.device("cpu"), stream=2),
                           global_batch=len(x), rows=slice(None))
            want += (-10 * torch.log10((model.reconstruct(seen) - x).pow(2).flatten(1).mean(1))).tolist()
    assert noisy["val_psnr"] == pytest.approx(sum(want) / len(want), rel=1e-4)
    assert clean["val_objective"] == pytest.approx(clean["val_neg_elbo"])  # beta 1: the objective is the -ELBO


def test_patience_stops_after_that_many_epochs_without_improvement(blob_folder, tmp_path, monkeypatch):
    script_validation(monkeypatch, [50.0, 40.0, 45.0, 39.0, 39.0, 41.0] + [1.0] * 10)
    result = run(blob_folder, tmp_path / "run", model_config=TINY, epochs=16, lr=0.01, patience=2)
    lines = metrics(tmp_path / "run")
    # epoch 3 is worse (1 bad), 4 improves (reset), 5 only ties and 6 is worse: 2 bad epochs, stop
    assert result.stopped == "early-stop" and result.epoch == len(lines) == 6
    assert load_model(tmp_path / "run").training["metrics"]["epoch"] == 4


def test_ema_weights_are_saved_and_follow_the_update_rule(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "run", model_config=TINY, steps=1, lr=0.01, ema=0.5)
    state = load_file(str(tmp_path / "run" / "state.safetensors"))
    raw = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    ema = {k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")}
    torch.manual_seed(SEED)  # train() builds its initial weights right after this seed
    init = VAE(TINY).state_dict()
    params = {name for name, _ in VAE(TINY).named_parameters()}
    for name, value in ema.items():
        # after one step: ema = decay * init + (1 - decay) * raw for parameters; buffers are copied
        want = 0.5 * init[name] + 0.5 * raw[name] if name in params else raw[name]
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    assert not same_weights(raw, ema)
    for saved in ("model.safetensors", "last.safetensors"):
        assert same_weights(state_dict(tmp_path / "run" / saved), ema), saved


def test_ema_weights_are_the_ones_validated(blob_folder, tmp_path):
    run(blob_folder, tmp_path / "run", model_config=TINY, epochs=3, lr=0.05, ema=0.9)
    last = metrics(tmp_path / "run")[-1]
    files = validation_files(blob_folder)
    ema_eval = evaluate(tmp_path / "run" / "last.safetensors", files, iw_samples=1, device="cpu")
    assert ema_eval.psnr == pytest.approx(last["val_psnr"], rel=1e-4)
    assert ema_eval.kl == pytest.approx(last["val_kl"], rel=1e-4)
    saved_scale = float(load_model(tmp_path / "run").model.log_scale.detach())
    assert last["decoder_log_scale"] == pytest.approx(saved_scale, abs=1e-6)
    model = VAE(TINY)
    state = load_file(str(tmp_path / "run" / "state.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    raw_eval = evaluate(model, files, iw_samples=1, device="cpu")
    assert abs(raw_eval.kl - last["val_kl"]) > 1e-3 * abs(last["val_kl"])  # the raw weights would score differently
