"""The one display of the CLI: every command's events on stderr, results on stdout, the exit code for failures."""

from __future__ import annotations

import json

import pytest
import typer

from vaetool.cli import common
from vaetool.cli.common import Display
from vaetool.events import Epoch, Failed, Note, Progress, Saved, Skipped, Started, Warning, Written


@pytest.fixture(autouse=True)
def fresh_console(monkeypatch):
    monkeypatch.setattr(common, "_console", None)  # a console on the stderr pytest captures


def test_a_batch_command_prints_results_failures_and_a_summary(capsys):
    display = Display("reconstruct", quiet=False)
    for event in (Started("reconstruct", 3), Written("out/a.png", "in/a.png"), Skipped("out/b.png", "in/b.png"),
                  Failed("in/c.png", "not an image PIL can read"), Progress(3, 3)):
        display(event)
    with pytest.raises(typer.Exit) as exit_:
        display.finish()
    out, err = capsys.readouterr()
    assert exit_.value.exit_code == 3 and out == "out/a.png\n"
    assert "failed: in/c.png: not an image PIL can read" in err
    assert "reconstruct: done 1, skipped 1, failed 1 (of 3)" in err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 3 input(s) failed")


def test_json_records_and_quiet_keeps_only_failures(capsys):
    display = Display("denoise", quiet=True, as_json=True)
    for event in (Started("denoise", 2, info={"device": "cpu"}), Note("plain reconstruction"), Warning("16-bit"),
                  Written("o/x.png", "i/x.png"), Written("o/y.png")):
        display(event)
    display.finish()
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"input": "i/x.png", "output": "o/x.png", "status": "written"},
        {"input": None, "output": "o/y.png", "status": "written"}]
    assert err == ""
    display = Display("denoise", quiet=True)
    display(Failed("i/z.png", "i/z.png: truncated"))  # a reason that names the file already is not named twice
    with pytest.raises(typer.Exit):
        display.finish()
    assert capsys.readouterr().err.splitlines()[0] == "failed: i/z.png: truncated"


def test_the_training_stream(capsys):
    display = Display("train", quiet=False)
    display(Started("train", 100, unit="steps", info={"device": "cpu", "precision": "fp32"}))
    display(Progress(50, 100, metrics={"loss": 12.5, "images/s": 300.0}))
    display(Epoch(1, 50, {"train_loss": 12.5, "val_psnr": 21.25}))
    assert not display.state_saved
    display(Saved("run/state.safetensors", "interrupted"))
    display.finish(summary=False)
    err = capsys.readouterr().err
    assert "train: 100 steps; device cpu, precision fp32" in err
    assert "epoch 1 step 50: train_loss 12.5, val_psnr 21.25" in err
    assert display.state_saved


def test_skipped_failed_and_extra_files_are_json_records_too(capsys):
    display = Display("sample", quiet=True, as_json=True)
    for event in (Skipped("o/a.png", "i/a.png"), Failed("i/b.png", "truncated"), Saved("o/grid.png", "grid"),
                  Saved("run/state.safetensors", "interrupted")):
        display(event)
    display.close()
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"input": "i/a.png", "output": "o/a.png", "status": "skipped"},
        {"input": "i/b.png", "output": None, "status": "failed", "reason": "truncated"},
        {"input": None, "output": "o/grid.png", "status": "written", "kind": "grid"}]
    assert "failed: i/b.png: truncated" in err


def test_the_denoiser_warns_when_outputs_move_too_far_from_their_inputs():
    import torch

    from vaetool.inference.denoise import ChangeMeter

    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 32, 32, generator=generator)
    noisy = (clean + 50 / 255 * torch.randn(3, 32, 32, generator=generator)).clamp(0, 1)
    denoised = ChangeMeter()
    denoised(None, noisy, clean)  # strong noise removed: a large change, but no colour shift
    assert denoised.warning() is None
    misfit = ChangeMeter()
    misfit(None, noisy, (clean * 0.5 + 0.4).clamp(0, 1))  # colours moved: not what removing noise does
    assert "may not fit these images" in misfit.warning()
