"""Option values are checked at parse time, before torch loads: exit 2 naming the flag; help lists choices and flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vaetool.cli.app import COMMANDS, app

VAETOOL = str(Path(sys.executable).with_name("vaetool"))

# (arguments, the flag the error must name, more text it must hold); CKPT, IN and OUT are placeholders that
# need not exist: the value is refused before any file is opened.
BAD_VALUES = [
    (["train", "IN", "-o", "OUT", "--likelihood", "gausian"], "--likelihood", "bernoulli"),
    (["train", "IN", "-o", "OUT", "--decoder-scale", "learnt"], "--decoder-scale", "learned"),
    (["train", "IN", "-o", "OUT", "--image-size", "50"], "--image-size", "48 or 52"),
    (["train", "IN", "-o", "OUT", "--image-size", "12", "--widths", "8,16,32"], "--image-size", "multiple of 8 (e.g. 8 or 16)"),
    (["train", "IN", "-o", "OUT", "--time", "5x"], "--time", "90s"),
    (["train", "IN", "-o", "OUT", "--widths", "32,x"], "--widths", "32,64"),
    (["train", "IN", "-o", "OUT", "--corrupt", "blur:0.1"], "--corrupt", "gaussian"),
    (["train", "IN", "-o", "OUT", "--corrupt", "mask:2"], "--corrupt", "<= 1"),
    (["train", "IN", "-o", "OUT", "--cache-memory", "lots"], "--cache-memory", "4G"),
    (["train", "IN", "-o", "OUT", "--beta", "-1"], "--beta", ">= 0"),
    (["train", "IN", "-o", "OUT", "--beta", "nan"], "--beta", ">= 0"),
    (["train", "IN", "-o", "OUT", "--lr", "0"], "--lr", "> 0"),
    (["train", "IN", "-o", "OUT", "--channels", "2"], "--channels", "auto"),
    (["train", "IN", "-o", "OUT", "--precision", "fp8"], "--precision", "bf16"),
    (["train", "IN", "-o", "OUT", "--device", "tpu"], "--device", "cuda:N"),
    (["train", "-o", "OUT"], "DATA", "train on"),
    (["sample", "CKPT", "-o", "OUT", "--ext", "xyz"], "--ext", "webp"),
    (["sample", "CKPT", "-o", "OUT", "--grid", "g.txt"], "--grid", "image extension"),
    (["decode", "CKPT", "z.npy", "-o", "OUT", "--ext", "docx"], "--ext", "png"),
    (["interpolate", "CKPT", "a.png", "b.png", "-o", "OUT", "--method", "cubic"], "--method", "slerp"),
    (["interpolate", "CKPT", "a.png", "b.png", "-o", "OUT", "--gif", "walk.png"], "--gif", ".gif"),
    (["interpolate", "CKPT", "a.png", "-o", "OUT"], "ANCHORS", "two"),
    (["reconstruct", "CKPT", "IN", "-o", "OUT", "--ext", "xyz"], "--ext", "png"),
    (["traverse", "CKPT", "-o", "t.txt"], "--output", "image extension"),
    (["traverse", "CKPT", "-o", "t.png", "--dims", "0,x"], "--dims", "0,3,5"),
    (["encode", "CKPT", "IN", "-o", "z.txt"], "--output", ".npy"),
    (["encode", "CKPT", "IN", "-o", "z.npy", "--sample"], "--sample", "safetensors"),
    (["encode", "CKPT", "IN"], "--output", "--jsonl"),
    (["denoise", "CKPT", "IN", "-o", "OUT", "--ext", "docx"], "--ext", "tif"),
    (["denoise", "CKPT", "IN", "-o", "OUT", "--precision", "fp8"], "--precision", "fp32"),
    (["denoise", "CKPT", "IN", "-o", "OUT", "--tile", "huge"], "--tile", "auto"),
    (["eval", "CKPT", "IN", "--device", "cuda:x"], "--device", "cuda:N"),
    (["latent-map", "CKPT", "IN", "-o", "map.bmp"], "--output", ".svg"),
    (["latent-map", "CKPT", "IN", "-o", "map.png", "--method", "tsne"], "--method", "pca"),
    (["latent-map", "CKPT", "IN", "-o", "map.png", "--dims", "0"], "--dims", "exactly two"),
    (["latent-map", "CKPT", "IN", "-o", "map.png", "--color-by", "smile"], "--color-by", "FILE.csv:COLUMN"),
    (["latent-map", "CKPT", "IN", "-o", "map.png", "--extent", "0"], "--extent", "> 0"),
    # --seed drives nothing in these commands (no random draw), so they do not take it
    (["decode", "CKPT", "z.npy", "-o", "OUT", "--seed", "1"], "--seed", "No such option"),
    (["interpolate", "CKPT", "a.png", "b.png", "-o", "OUT", "--seed", "1"], "--seed", "No such option"),
    (["reconstruct", "CKPT", "IN", "-o", "OUT", "--seed", "1"], "--seed", "No such option"),
    (["traverse", "CKPT", "-o", "t.png", "--seed", "1"], "--seed", "No such option"),
]

_PROBE = """
import json, sys
from typer.testing import CliRunner
from vaetool.cli.app import app
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    results.append({"code": r.exit_code, "stderr": r.stderr, "stdout": r.stdout, "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def _placeholders(args: list[str], tmp: Path) -> list[str]:
    names = {"CKPT": tmp / "none.safetensors", "IN": tmp / "images", "OUT": tmp / "out"}
    return [str(names.get(a, a)) for a in args]


def test_bad_values_exit_2_naming_the_flag_before_torch_loads(tmp_path):
    cases = [_placeholders(args, tmp_path) for args, _, _ in BAD_VALUES]
    probe = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert probe.returncode == 0, probe.stderr
    problems = []
    for (args, flag, text), result in zip(BAD_VALUES, json.loads(probe.stdout)):
        err = " ".join(result["stderr"].replace("│", " ").split())
        if result["code"] != 2 or flag not in err or text not in err or result["stdout"] or result["torch"]:
            problems.append(f"{' '.join(args)}: exit {result['code']}, torch {result['torch']}: {err}")
        if result["torch"]:
            break  # later cases would all report it
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "out").exists()


def test_resume_compares_every_stored_setting_but_the_budget():
    from vaetool.cli.train import RESUME_IGNORES
    from vaetool.config import ModelConfig, TrainConfig

    model = {key for section, key in RESUME_IGNORES.values() if section == "model_config"}
    train = {key for section, key in RESUME_IGNORES.values() if section == "train_config"}
    # no CLI option for min_log_scale; noise_sigma comes with --noise-model (or is estimated)
    assert model == set(ModelConfig.__dataclass_fields__) - {"min_log_scale", "noise_sigma"}
    assert train == set(TrainConfig.__dataclass_fields__) - {"epochs", "steps", "time_limit", "weight_decay"}


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_help_lists_every_command_choices_and_shows_flags_as_flags():
    top = _help()
    for name, function, _ in COMMANDS:
        summary = function.__doc__.strip().splitlines()[0]
        assert name in top and summary in top, name
    train = _help("train")
    for choices in ("<gaussian|laplace|bernoulli>", "<optimal|learned|fixed>", "<auto|1|3>", "<auto|fp32|bf16|fp16>"):
        assert choices in train
    for panel in ("Data", "Model", "Objective", "Optimisation", "Budget", "Output", "Performance"):
        assert f"─ {panel} ─" in train, panel
    assert "<slerp|lerp>" in _help("interpolate") and "<auto|pca|dims>" in _help("latent-map")
    assert "png|jpg|jpeg|tif|tiff|webp" in _help("sample")
    for name, _, _ in COMMANDS:
        text = _help(name)
        assert "--debug" in text, name  # the global option, also after the subcommand
        flags_typed = [line for line in text.splitlines() if "<bool>" in line and "--help" not in line]
        assert not flags_typed, (name, flags_typed)


def test_every_command_defaults_to_the_same_batch_size():
    import typer

    group = typer.main.get_command(app)
    defaults = {name: param.default for name, command in group.commands.items() for param in command.params
                if param.name == "batch_size"}
    assert len(defaults) >= 10 and set(defaults.values()) == {64}, defaults


def test_every_command_runs_inside_the_error_wrapper(monkeypatch, tmp_path):
    """A VaetoolError from any command body is one `error:` line and exit 1, with a traceback after --debug."""
    import typer

    from vaetool.cli import app as app_module
    from vaetool.errors import DataError

    def failing(*, name: str = "x") -> None:
        raise DataError(f"{name}: no such thing; give another")

    for name, function, _ in COMMANDS:  # each registered callback is the wrapper around its command
        registered = next(c.callback for c in app.registered_commands if c.name == name)
        assert registered.__wrapped__ is function, name
    wrapped = app_module.wrap_command(failing)
    monkeypatch.setenv("VAETOOL_DEBUG", "0")  # restored afterwards, though --debug below sets it
    with pytest.raises(typer.Exit) as stopped:
        wrapped(name="x")
    assert stopped.value.exit_code == 1
    with pytest.raises(DataError):  # --debug, given after the subcommand, reaches the wrapper
        wrapped(name="x", debug=True)


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    missing = str(tmp_path / "none.safetensors")
    plain = subprocess.run([VAETOOL, "info", missing], capture_output=True, text=True, env=env, timeout=120)
    debug = subprocess.run([VAETOOL, "info", missing, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and plain.stderr.startswith("error:") and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_shell_completion_is_on_and_completes_commands_and_choices():
    assert "--install-completion" in _help()

    def complete(words: str, index: int) -> list[str]:
        env = {**os.environ, "_VAETOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(index)}
        done = subprocess.run([VAETOOL], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("vaetool tr", 1) == ["train", "traverse"]
    assert complete("vaetool train --likelihood ", 3) == ["gaussian", "laplace", "bernoulli"]
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}  # take the shell as given
    shown = subprocess.run([VAETOOL, "--show-completion", "bash"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert shown.returncode == 0 and "_VAETOOL_COMPLETE" in shown.stdout


def test_every_output_format_choice_is_written_by_the_image_writer(tmp_path):
    import torch
    from PIL import Image

    from vaetool.cli.options import ImageFormat
    from vaetool.io.find import IMAGE_EXTENSIONS
    from vaetool.io.write import write_image

    assert {f".{f.value}" for f in ImageFormat} == set(IMAGE_EXTENSIONS)  # what vaetool reads, it writes
    pixels = torch.rand(3, 6, 10)
    for fmt in ImageFormat:
        path = write_image(tmp_path / f"x.{fmt.value}", pixels)
        assert Image.open(path).size == (10, 6), fmt
