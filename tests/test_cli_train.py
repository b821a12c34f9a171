"""`vaetool train` and `vaetool info` as a user runs them: exit codes, stdout vs stderr, no torch for --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from conftest import TINY_ARGS, make_blobs
from vaetool.cli.app import app

VAETOOL = str(Path(sys.executable).with_name("vaetool"))


def _run(*args, stdin=None):
    env = dict(os.environ)
    env.pop("VAETOOL_DEBUG", None)
    return subprocess.run([VAETOOL, *args], capture_output=True, text=True, input=stdin, env=env, timeout=300)


def test_installed_command_trains_and_info_reads_it(tmp_path):
    data = tmp_path / "data"
    make_blobs(data / "sub", count=6)
    make_blobs(data, count=6, seed=1)
    (data / "notes.txt").write_text("not an image")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = _run("train", str(data), "-o", str(tmp_path / "run"), "--steps", "3", *TINY_ARGS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "run" / "model.safetensors")]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    info = _run("info", str(tmp_path / "run"), "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["model"]["image_size"] == 16 and summary["training"]["images"] == 12
    assert summary["parameters"] > 0
    text = _run("info", str(tmp_path / "run" / "last.safetensors"))
    assert "parameters" in text.stdout and text.returncode == 0
    # one column of names, however long, then the values: "model.image_size  16", not "model.image_size16"
    rows = [line.split(None, 1) for line in text.stdout.splitlines()]
    assert all(len(row) == 2 for row in rows), text.stdout
    assert dict(rows)["model.image_size"] == "16" and dict(rows)["training.train_images"].isdigit()
    starts = {len(line) - len(line.split(None, 1)[1]) for line in text.stdout.splitlines()}
    assert len(starts) == 1, text.stdout


def test_paths_from_stdin_and_json_summary(tmp_path):
    paths = make_blobs(tmp_path / "data", count=8)
    result = _run("train", "-", "-o", str(tmp_path / "run"), "--steps", "2", "--json", *TINY_ARGS,
                  stdin="\n".join(map(str, paths)) + "\n")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step"] == 2 and summary["checkpoint"].endswith("model.safetensors")


def test_errors_are_one_line_with_exit_codes(tmp_path):
    missing = _run("train", str(tmp_path / "nope"), "-o", str(tmp_path / "run"), *TINY_ARGS)
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error:") and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stdout == ""
    usage = _run("train", str(tmp_path), "-o", str(tmp_path / "run"), "--batch-size", "0")
    assert usage.returncode == 2
    bad_ckpt = tmp_path / "x.safetensors"
    bad_ckpt.write_bytes(b"garbage" * 10)
    info = _run("info", str(bad_ckpt))
    assert info.returncode == 1 and "x.safetensors" in info.stderr and "Traceback" not in info.stderr


def test_existing_run_is_not_overwritten(tmp_path):
    make_blobs(tmp_path / "data", count=6)
    args = ["train", str(tmp_path / "data"), "-o", str(tmp_path / "run"), "--steps", "1", *TINY_ARGS]
    assert _run(*args).returncode == 0
    again = _run(*args)
    assert again.returncode == 1 and "--resume" in again.stderr


def test_help_does_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom vaetool.cli.app import app\n"
            "r = CliRunner().invoke(app, ['--help']); r2 = CliRunner().invoke(app, ['train', '--help'])\n"
            "assert r.exit_code == 0 and r2.exit_code == 0, (r.output, r2.output)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_version_and_no_args():
    runner = CliRunner()
    assert "vaetool" in runner.invoke(app, ["--version"]).output
    assert runner.invoke(app, []).exit_code in (0, 2)


def test_progress_lines_without_a_terminal_follow_log_every(tmp_path):
    make_blobs(tmp_path / "data", count=8)
    result = _run("train", str(tmp_path / "data"), "-o", str(tmp_path / "run"), "--steps", "4", "--log-every", "2",
                  *[a for a in TINY_ARGS if a != "-q"])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert "50% of the budget, eta" in lines[0] and "100% of the budget" in lines[1]
