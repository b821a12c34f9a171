"""Training report (report.png, self-contained report.html) and the TensorBoard callback adapter."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vaetool.io.write import save_grid
from vaetool.training import tboard
from vaetool.checkpoint import save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig, TrainConfig
from vaetool.errors import ConfigError, DataError
from vaetool.events import Epoch, Progress, Saved
from vaetool.models.vector import VAE
from vaetool.training.report import REPORT_DPI, REPORT_INCHES, read_metrics, report_figure, write_report

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _metrics(epochs: int = 3, *, beta: float = 1.0) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        rows.append({"epoch": e, "step": 10 * e, "partial": False, "train_loss": 100.0 / e, "train_recon": 90.0 / e,
                     "train_kl": 5.0 + e, "train_neg_elbo": 95.0 / e + e, "elapsed": 1.5 * e, "beta": beta,
                     "decoder_log_scale": -1.0, "val_neg_elbo": 97.0 / e, "val_recon": 91.0 / e, "val_kl": 6.0 + e,
                     "val_psnr": 10.0 + e, "best": True})
    return rows


def _fake_run(folder: Path, rows: list[dict], *, grids: bool = True, checkpoint: bool = True) -> Path:
    """A run folder as `vaetool train` leaves it, without the training."""
    (folder / "grids").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = torch.Generator().manual_seed(0)
    if grids:
        save_grid(folder / "samples.png", torch.rand(64, 3, 16, 16, generator=g), nrow=8)
        save_grid(folder / "reconstructions.png", torch.rand(32, 3, 16, 16, generator=g), nrow=16)
    if checkpoint:
        torch.manual_seed(0)
        model = VAE(ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)))
        save_model(folder / "model.safetensors", model, train_config=TrainConfig(beta=0.5, seed=7),
                   training={"step": rows[-1]["step"], "epoch": rows[-1]["epoch"], "metrics": rows[-1]})
    return folder


def _embedded(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in DATA_URI.findall(html)]


def test_report_png_and_self_contained_html(tmp_path):
    run = _fake_run(tmp_path / "run", _metrics(3))
    png, html_path = write_report(run)
    assert (png, html_path) == (run / "report.png", run / "report.html")
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size == (REPORT_INCHES[0] * REPORT_DPI, REPORT_INCHES[1] * REPORT_DPI)
    page = html_path.read_text()
    embedded = _embedded(page)
    assert len(embedded) == 3  # the curves, the samples and the reconstructions
    assert embedded[1].size == Image.open(run / "samples.png").size
    assert embedded[2].size == Image.open(run / "reconstructions.png").size
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page  # readable offline
    assert "model.latent_dim" in page and "train.seed" in page and ">7<" in page  # the configuration
    table = page[page.index("<h2>Metrics"):]
    assert table.count("<tr>") + table.count('<tr class="best">') == 1 + 3  # header + one row per epoch
    assert "val_psnr" in table and "13" in table


def test_report_figure_has_three_curve_panels_and_two_grids(tmp_path):
    rows = _metrics(4)
    run = _fake_run(tmp_path / "run", rows)
    fig = report_figure(run)
    curves, grids = fig.axes[:3], fig.axes[3:]
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in curves] == ["-ELBO (nats/image)", "reconstruction -log p(x|z)",
                                                 "KL(q(z|x) || p(z))"]
    for ax, (train_key, val_key) in zip(curves, [("train_neg_elbo", "val_neg_elbo"), ("train_recon", "val_recon"),
                                                 ("train_kl", "val_kl")]):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["train"].get_xdata()) == [r["step"] for r in rows]
        assert list(lines["train"].get_ydata()) == [r[train_key] for r in rows]
        assert list(lines["validation"].get_ydata()) == [r[val_key] for r in rows]
        assert "train objective (beta-weighted)" not in lines
    assert [len(ax.get_images()) for ax in grids] == [1, 1]
    assert grids[0].get_images()[0].get_array().shape[:2] == Image.open(run / "samples.png").size[::-1]


def test_beta_other_than_one_adds_the_objective_curve_and_missing_grids_are_said(tmp_path):
    run = _fake_run(tmp_path / "run", _metrics(2, beta=4.0), grids=False, checkpoint=False)
    fig = report_figure(run)
    assert "train objective (beta-weighted)" in [line.get_label() for line in fig.axes[0].get_lines()]
    assert [t.get_text() for t in fig.axes[3].texts] == ["no grid yet"]
    _, html_path = write_report(run)
    page = html_path.read_text()
    assert len(_embedded(page)) == 1 and "no configuration" in page


def test_a_truncated_last_line_is_skipped_and_no_epoch_is_an_error(tmp_path):
    run = _fake_run(tmp_path / "run", _metrics(2), grids=False, checkpoint=False)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "st')
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no epoch yet"):
        read_metrics(run)
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "nothing")


def test_report_command_prints_both_paths_and_fails_cleanly(tmp_path):
    runner = CliRunner()
    run = _fake_run(tmp_path / "run", _metrics(2))
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(run / "report.png"), str(run / "report.html")]
    bad = runner.invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 1 and bad.stdout == "" and "metrics.jsonl does not exist" in bad.stderr


def test_report_of_a_real_training_run(blob_folder, tmp_path):
    from vaetool.training.trainer import train

    run = tmp_path / "run"
    train([blob_folder], run, model_config=ModelConfig(image_size=16, latent_dim=4, widths=(8, 16)),
          train_config=TrainConfig(epochs=1, batch_size=4, val_fraction=0.25), device="cpu", cache_dir=None)
    with Image.open(run / "report.png") as image:  # drawn by the training itself
        assert image.size == (REPORT_INCHES[0] * REPORT_DPI, REPORT_INCHES[1] * REPORT_DPI)
    assert len(_embedded((run / "report.html").read_text())) == 3
    assert [len(ax.get_lines()) > 1 for ax in report_figure(run).axes[:3]] == [True] * 3


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, tuple, int]] = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, array, step, dataformats):
        assert dataformats == "CHW"
        self.images.append((tag, array.shape, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_logger_logs_scalars_and_grids_and_passes_events_on(tmp_path):
    run = _fake_run(tmp_path / "run", _metrics(1), checkpoint=False)
    seen, writer = [], _FakeWriter()
    logger = tboard.TensorBoardLogger(run, inner=lambda e: seen.append(type(e)), writer=writer)
    logger(Progress(3, 12))  # the image cache's progress: no scalars
    logger(Progress(5, 12, {"loss": 1.0, "recon": 0.8, "kl": 0.2, "beta": 1.0, "images_per_s": 50.0,
                            "kl_top": 0.15}))
    logger(Epoch(1, 10, _metrics(1)[0]))
    logger(Saved("x", "best"))
    logger.close()
    assert seen == [Progress, Progress, Epoch, Saved] and writer.closed
    tags = {t for t, _, _ in writer.scalars}
    assert {"train/loss", "train/kl", "train/kl_top", "epoch/val_neg_elbo", "epoch/val_psnr"} <= tags
    assert ("train/loss", 1.0, 5) in writer.scalars and all(step == 5 for t, _, step in writer.scalars
                                                            if t.startswith("train/"))
    samples = Image.open(run / "samples.png").size
    assert ("grids/samples", (3, samples[1], samples[0]), 10) in writer.images and len(writer.images) == 2


def test_tensorboard_missing_says_how_to_install(monkeypatch, tmp_path):
    real = tboard.importlib.util.find_spec
    monkeypatch.setattr(tboard.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        tboard.tensorboard_callback(tmp_path)


def test_one_wild_point_is_clipped_and_marked_not_squashing_the_curve(tmp_path):
    rows = _metrics(8)
    rows[3]["train_kl"] = 1.2e6  # the KL spike of a short run
    run = _fake_run(tmp_path / "run", rows, grids=False)
    fig = report_figure(run)
    kl = fig.axes[2]
    low, high = kl.get_ylim()
    assert high < 100  # the ordinary values (6 to 14) fill the panel
    train_line = next(line for line in kl.get_lines() if line.get_label() == "train")
    assert max(train_line.get_ydata()) == high  # drawn at the edge
    marks = [line for line in kl.get_lines() if "off the scale" in str(line.get_label())]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [rows[3]["step"]]
    assert any("1.2e+06" in t.get_text() for t in kl.texts)  # its true value is written beside it
    elbo = fig.axes[0]  # no wild point there: matplotlib's own range, no marks
    assert not [line for line in elbo.get_lines() if "off the scale" in str(line.get_label())]


def test_robust_range_only_when_a_point_is_far_out():
    from vaetool.training.report import robust_range

    assert robust_range([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    span = robust_range([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 1e6])
    assert span is not None and 7.0 < span[1] < 1e3 and span[0] < 1.0


def test_the_heading_shows_the_best_epoch_and_the_run_provenance(tmp_path):
    rows = _metrics(3)
    rows[2]["val_neg_elbo"], rows[2]["val_psnr"] = 500.0, 99.0  # the last epoch is worse and has another PSNR
    rows[2]["best"] = False  # as the trainer marks it
    run = _fake_run(tmp_path / "run", rows)
    (run / "run.json").write_text(json.dumps({"command": "vaetool train faces -o run", "data": ["faces"],
                                              "device": "cpu (Xeon)", "precision": "bf16"}))
    title = report_figure(run)._suptitle.get_text()
    assert "best epoch 2: -ELBO 48.50 nats/image, PSNR 12.00 dB" in title and "99.00" not in title
    assert "vaetool train faces -o run" in title and "cpu (Xeon), bf16" in title
    page = write_report(run)[1].read_text()
    assert "vaetool train faces -o run" in page and "bf16" in page
