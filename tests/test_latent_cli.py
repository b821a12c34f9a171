"""The latent-space commands through the CLI: exit codes, stdout holding only results, stdin, resume, safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import make_blobs
from vaetool.cli.app import app
from vaetool.io.latents import load_latents

runner = CliRunner()


def invoke(*args, stdin: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=stdin)


@pytest.fixture
def data(tmp_path) -> Path:
    make_blobs(tmp_path / "in", count=3, seed=1)
    make_blobs(tmp_path / "in" / "gray", count=2, seed=2, mode="L")
    return tmp_path / "in"


@pytest.mark.parametrize("args", [
    ["sample", "{ckpt}", "-o", "{out}", "-n", "-1"],
    ["sample", "{ckpt}", "-o", "{out}", "--temperature", "-0.5"],
    ["interpolate", "{ckpt}", "a.png", "b.png", "-o", "{out}", "--steps", "1"],
    ["interpolate", "{ckpt}", "a.png", "b.png", "-o", "{out}", "--method", "cubic"],
    ["traverse", "{ckpt}", "-o", "{out}/t.png", "--range", "0"],
    ["traverse", "{ckpt}", "-o", "{out}/t.png", "--steps", "1"],
    ["encode", "{ckpt}", "{out}"],  # neither -o nor --jsonl
    ["decode", "{ckpt}", "z.npy", "-o", "{out}", "--batch-size", "0"],
    ["reconstruct", "{ckpt}", "{out}", "-o", "{out}/r", "--no-such-option"],
])
def test_out_of_range_options_are_usage_errors(ckpt, tmp_path, args):
    result = invoke(*[a.format(ckpt=ckpt, out=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""


def test_one_line_errors_exit_1(ckpt, data, tmp_path):
    missing = invoke("sample", tmp_path / "nope", "-n", 2, "-o", tmp_path / "s")
    assert missing.exit_code == 1 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    invoke("encode", ckpt, data, "-o", tmp_path / "z.safetensors", "-q")
    again = invoke("encode", ckpt, data, "-o", tmp_path / "z.safetensors", "-q")
    assert again.exit_code == 1 and "--force" in again.stderr
    assert invoke("encode", ckpt, data, "-o", tmp_path / "z.safetensors", "-q", "--force").exit_code == 0
    bad_dims = invoke("traverse", ckpt, "-o", tmp_path / "t.png", "--dims", "0,9")
    assert bad_dims.exit_code == 1 and "0..3" in bad_dims.stderr
    no_row = invoke("interpolate", ckpt, f"{tmp_path / 'z.safetensors'}:0", f"{tmp_path / 'z.safetensors'}:99",
                    "-o", tmp_path / "f")
    assert no_row.exit_code == 1 and "row 99" in no_row.stderr
    save_file({"mu": torch.zeros(2, 6)}, str(tmp_path / "wide.safetensors"))
    wide = invoke("interpolate", ckpt, f"{tmp_path / 'wide.safetensors'}:0", data / "img_000.png", "-o", tmp_path / "f")
    assert wide.exit_code == 1 and "latent_dim is 4" in wide.stderr


def test_encode_from_stdin_keeps_order_and_converts_gray(ckpt, data, tmp_path):
    files = [data / "img_002.png", data / "gray" / "img_000.png", data / "img_000.png"]
    stdin = "".join(f"{f}\n" for f in files)
    result = invoke("encode", ckpt, "-", "-o", tmp_path / "z.safetensors", "-q", "--sample", stdin=stdin)
    assert result.exit_code == 0, result.output
    table = load_latents(tmp_path / "z.safetensors")
    assert json.loads(table.metadata["paths"]) == [str(f) for f in files]
    assert set(load_latents(tmp_path / "z.safetensors", key="z").metadata) >= {"checkpoint", "model_config"}
    lines = invoke("encode", ckpt, "-", "--jsonl", stdin=stdin).stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == [str(f) for f in files]
    torch.testing.assert_close(torch.tensor([r["mu"] for r in records]), table.values)


def test_bad_inputs_are_named_and_exit_3(ckpt, data, tmp_path):
    (data / "broken.png").write_bytes(b"nope")
    (data / "gray" / "empty.jpg").write_bytes(b"")
    result = invoke("encode", ckpt, data, "-o", tmp_path / "z.safetensors", "-q")
    assert result.exit_code == 3
    assert "broken.png" in result.stderr and "empty.jpg" in result.stderr
    assert result.stdout.strip() == str(tmp_path / "z.safetensors")
    assert len(load_latents(tmp_path / "z.safetensors").values) == 5
    ranked = invoke("traverse", ckpt, "-o", tmp_path / "t.png", "--data", data, "-q")
    assert ranked.exit_code == 3 and (tmp_path / "t.png").is_file()


def test_reconstruct_resumes_with_skip_existing_and_refuses_overwrite(ckpt, data, tmp_path):
    out = tmp_path / "rec"
    first = invoke("reconstruct", ckpt, data, "-o", out, "-q")
    assert first.exit_code == 0 and len(first.stdout.splitlines()) == 5
    (out / "gray" / "img_001.png").unlink()
    before = (out / "img_000.png").stat().st_mtime_ns
    resumed = invoke("reconstruct", ckpt, data, "-o", out, "--skip-existing", "-q")
    assert resumed.exit_code == 0 and resumed.stdout.splitlines() == [str(out / "gray" / "img_001.png")]
    assert (out / "img_000.png").stat().st_mtime_ns == before
    refused = invoke("reconstruct", ckpt, data, "-o", out, "-q")
    assert refused.exit_code == 1 and refused.stdout == "" and "--force" in refused.stderr
    assert Image.open(out / "gray" / "img_001.png").mode == "RGB"  # gray input converted to the model's RGB
    inside = invoke("reconstruct", ckpt, data, "-o", data / "rec")
    assert inside.exit_code == 1 and "inside input folder" in inside.stderr


def test_decode_stays_inside_the_output_folder_and_warns_on_another_checkpoint(ckpt, tmp_path):
    metadata = {"format": "vaetool", "kind": "latents", "relative": json.dumps(["../../evil.png", "ok.png"]),
                "checkpoint": "0123456789ab"}
    save_file({"mu": torch.zeros(2, 4)}, str(tmp_path / "z.safetensors"), metadata=metadata)
    result = invoke("decode", ckpt, tmp_path / "z.safetensors", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(tmp_path / "out" / "000000.png"), str(tmp_path / "out" / "000001.png")]
    assert not (tmp_path.parent / "evil.png").exists()
    assert "another checkpoint" in result.stderr
    missing_key = invoke("decode", ckpt, tmp_path / "z.safetensors", "-o", tmp_path / "o2", "--key", "z")
    assert missing_key.exit_code == 1 and "--key" in missing_key.stderr


def test_interpolate_gif_grid_and_json(ckpt, data, tmp_path):
    result = invoke("interpolate", ckpt, data / "img_000.png", data / "gray" / "img_000.png", "-o", tmp_path / "f",
                    "--steps", 5, "--gif", tmp_path / "walk.gif", "--grid", tmp_path / "strip.png", "--json", "-q")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["status"] == "written" and r["input"] is None for r in records)
    frames = [r["output"] for r in records if "kind" not in r]
    assert [Path(p).name for p in frames] == [f"frame_{i:04d}.png" for i in range(5)]
    assert [(r["kind"], r["output"]) for r in records if "kind" in r] == [("grid", str(tmp_path / "strip.png")),
                                                                        ("gif", str(tmp_path / "walk.gif"))]
    gif = Image.open(tmp_path / "walk.gif")
    assert gif.n_frames == 8  # there and back again: 5 + 3
    assert Image.open(tmp_path / "strip.png").size == (5 * 18 + 2, 18 + 2)


def test_traverse_defaults_to_every_dimension_when_few(ckpt, tmp_path):
    result = invoke("traverse", ckpt, "-o", tmp_path / "t.png", "--steps", 3, "-q")
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "t.png")
    assert Image.open(tmp_path / "t.png").size == (3 * 18 + 2, 4 * 18 + 2)  # 4 rows: latent_dim 4
    again = invoke("traverse", ckpt, "-o", tmp_path / "t.png", "-q")
    assert again.exit_code == 1 and "exists" in again.stderr


def test_installed_command_end_to_end(ckpt, data, tmp_path):
    """Pipe `sample` and `encode -o -` of a run folder like a shell user: stdout holds results only."""
    env = {k: v for k, v in os.environ.items() if k != "VAETOOL_DEBUG"}
    exe = str(Path(sys.executable).with_name("vaetool"))
    run = tmp_path / "run"  # a run folder: its model.safetensors is the checkpoint
    run.mkdir()
    (run / "model.safetensors").write_bytes(ckpt.read_bytes())
    script = (f"{exe} sample {run} -n 5 -o {tmp_path / 's'} --seed 1 && "
              f"find {data} -name '*.png' | sort | {exe} encode {run} - -o - --batch-size 2")
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                           timeout=180)
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    samples, records = lines[:5], [json.loads(line) for line in lines[5:]]
    assert all(Path(p).is_file() and p.endswith(".png") for p in samples)
    assert [r["path"] for r in records] == sorted(str(p) for p in data.rglob("*.png"))
    assert all(len(r["mu"]) == 4 for r in records)


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
def test_an_unreadable_subfolder_is_a_failed_input_and_exit_3(ckpt, data, tmp_path, monkeypatch, command):
    locked = data / "gray"
    real_scandir = os.scandir

    def scandir(path=".", *args):
        if Path(path) == locked:  # as a folder without read permission (root reads through chmod)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    target = tmp_path / ("z.safetensors" if command == "encode" else "rec")
    result = invoke(command, ckpt, data, "-o", target, "-q")
    assert result.exit_code == 3, result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and str(locked) in failed[0] and "cannot read folder" in failed[0]
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1")
    if command == "reconstruct":
        assert len(result.stdout.splitlines()) == 3  # the readable images are still written
    else:
        assert len(load_latents(target).values) == 3
