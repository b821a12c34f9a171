"""Hostile inputs and faults, through the real CLI: every case of the reliability sweep (issue 8).

Most cases run the Typer app in process (CliRunner, stdout and stderr apart); Ctrl-C, kill -9, an
unprivileged user and the interrupted batch run the installed `vaetool` command in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TINY_ARGS, make_blobs
from hostile import BAD, make_hostile_folder
from vaetool.io import atomic as atomic_module
from vaetool import checkpoint as ckpt_module
from vaetool.checkpoint import FORMAT_VERSION, load_model, read_metadata, save_model
from vaetool.cli.app import app
from vaetool.config import ModelConfig
from vaetool.inference.tiledenoise import join_outputs, split_image
from vaetool.io.decode import load_image, read_image
from vaetool.io.latents import load_latents
from vaetool.models.vector import VAE
from vaetool.inference.tiling import blend_tiles, extract_tiles, plan_tiles

ROOT = Path(__file__).resolve().parents[1]
VAETOOL = str(Path(sys.executable).with_name("vaetool"))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534
runner = CliRunner()
# One thread per subprocess: runs that are compared weight for weight must do the same arithmetic,
# and two cores shared with other work are slower with more threads, not faster.
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "VAETOOL_DEBUG": "0"}
TRAIN = ["--image-size", "16", "--widths", "8,16", "--latent-dim", "4", "--batch-size", "2", "--no-disk-cache",
         "--device", "cpu", "--no-report"]


def invoke(*args, stdin: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=stdin)


def one_error_line(result, *needles: str) -> str:
    """The result is exactly one `error:` line on stderr (no traceback) that contains every needle."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed): size, mtime and content hash where readable."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            state[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            st = path.stat()
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:
                digest = None
            state[str(path)] = (st.st_size, st.st_mtime_ns, digest)
    return state


def visible_files(folder: Path) -> list[Path]:
    """Files under `folder` whose names a user sees as outputs (no hidden temporary files)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                          for part in p.relative_to(folder).parts))


def assert_valid_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("hostile") / "h"
    return root, make_hostile_folder(root)


# ------------------------------------------------------------------------------------------ inputs


def _named(stderr: str, prefix: str, root: Path, names: list[str]) -> dict[str, int]:
    """How often each hostile file is named on a `prefix` line of stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    return {name: sum(str(root / name) in line for line in lines) for name in names}


def _check_failures_named_once(stderr: str, prefix: str, root: Path, layout: dict[str, list[str]]) -> None:
    bad_counts = _named(stderr, prefix, root, layout["bad"])
    assert all(count == 1 for count in bad_counts.values()), (bad_counts, stderr)
    good_counts = _named(stderr, prefix, root, layout["good"])
    assert not any(good_counts.values()), (good_counts, stderr)
    for name in layout["bad"]:  # with its reason
        line = next(line for line in stderr.splitlines() if str(root / name) in line)
        assert BAD.get(name, "") in line and len(line) > len(str(root / name)) + 20, line
    assert "Traceback" not in stderr and ".hidden" not in stderr


def test_train_on_the_hostile_folder_skips_each_bad_file_once(hostile, tmp_path):
    root, layout = hostile
    before = snapshot(root)
    result = invoke("train", root, "-o", tmp_path / "run", "--steps", 2, *TINY_ARGS[:-1], "--no-report", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout: the result only
    assert sorted(os.path.relpath(s["path"], root) for s in summary["skipped"]) == layout["bad"]
    _check_failures_named_once(result.stderr, "warning: skipped", root, layout)
    assert f"{len(layout['bad'])} file(s) could not be read" in result.stderr
    training = load_model(tmp_path / "run").training
    assert training["images"] == len(layout["good"])  # every good file is in the training set
    assert snapshot(root) == before


def _outputs_of_good_files(out: Path, layout: dict[str, list[str]]) -> list[Path]:
    return sorted(out / name for name in layout["good"])


@pytest.mark.parametrize("command", ["encode", "reconstruct", "denoise"])
def test_batch_commands_on_the_hostile_folder(ckpt, hostile, tmp_path, command):
    root, layout = hostile
    before = snapshot(root)
    out = tmp_path / "out"
    target = tmp_path / "latents.safetensors" if command == "encode" else out
    result = invoke(command, ckpt, root, "-o", target, "--device", "cpu")
    assert result.exit_code == 3, result.output
    _check_failures_named_once(result.stderr, "failed:", root, layout)  # the same line in every command
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    if command == "encode":
        assert result.stdout.splitlines() == [str(target)]
        table = load_latents(target)
        assert sorted(table.names) == layout["good"] and torch.isfinite(table.values).all()
    else:
        written = sorted(Path(line) for line in result.stdout.splitlines())
        assert written == _outputs_of_good_files(out, layout) == visible_files(out)
        for name in layout["good"]:
            image = assert_valid_image(out / name)
            if command == "denoise":  # native size, orientation applied
                with Image.open(root / name) as source:
                    assert image.size == ImageOps.exif_transpose(source).size, name
            else:
                assert image.size == (16, 16)
    assert snapshot(root) == before  # inputs untouched


def _world_readable_tree() -> Path:
    """A folder an unprivileged user can enter and write in (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="vaetool-rel-"))
    folder.chmod(0o777)
    return folder


def _as_user(command: list[str], cwd: Path, *, user: int | None) -> subprocess.CompletedProcess:
    # util-linux setpriv, not Popen(user=...): here the interpreter behind the venv lives under /root,
    # and only setpriv's exec of it succeeds once the user is dropped.
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    env = {**SUB_ENV, "HOME": str(cwd)}
    return subprocess.run(prefix + command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_unreadable_file_and_read_only_output_with_the_installed_command(ckpt):
    """Run as an unprivileged user (nobody, when the tests run as root, since root reads and writes
    through any permission bits): an unreadable input fails alone, a read-only -o is one clean error."""
    user = NOBODY if IS_ROOT else None
    if IS_ROOT and shutil.which("setpriv") is None:
        pytest.skip("running as root without util-linux setpriv: no way to drop to a user that permissions bind")
    base = _world_readable_tree()
    try:
        make_hostile_folder(base / "h")
        locked = base / "h" / "locked.png"
        locked.chmod(0)
        shutil.copy(ckpt, base / "model.safetensors")
        (base / "model.safetensors").chmod(0o644)
        for path in [base / "h", *(p for p in (base / "h").rglob("*") if p.is_dir() and not p.is_symlink())]:
            path.chmod(0o755)
        read_only = base / "read_only"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        before = snapshot(base / "h")

        run = _as_user([VAETOOL, "denoise", "model.safetensors", "h", "-o", "out", "--device", "cpu"], base, user=user)
        assert run.returncode == 3, run.stderr
        failed = [line for line in run.stderr.splitlines() if line.startswith("failed:")]
        assert sum("h/locked.png" in line for line in failed) == 1
        assert any("h/locked.png" in line and "Permission denied" in line for line in failed)
        assert len(failed) == len(BAD) + 1 and "Traceback" not in run.stderr
        assert len(run.stdout.splitlines()) == len(visible_files(base / "out")) > 5

        refused = _as_user([VAETOOL, "reconstruct", "model.safetensors", "h", "-o", "read_only/rec",
                            "--device", "cpu"], base, user=user)
        assert refused.returncode == 1 and refused.stdout == ""
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot write in read_only/rec"), refused.stderr
        assert "Permission denied" in lines[0] and list(read_only.iterdir()) == []
        assert snapshot(base / "h") == before
    finally:
        for path in base.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base)


# ------------------------------------------------------------------------------------ checkpoints


class _Marker:
    """A pickle that would create a file if anything ever unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def bad_checkpoints(ckpt, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_ckpt")
    good = load_model(ckpt)
    metadata = read_metadata(ckpt)
    files = {name: folder / f"{name}.safetensors" for name in
             ("random", "empty", "truncated", "foreign", "shape", "future", "image")}
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size * 2 // 3])
    save_file({"weight": torch.zeros(3, 3)}, str(files["foreign"]), metadata={"producer": "another program"})
    state = {k: v.clone() for k, v in good.model.state_dict().items()}
    state["decoder.out.weight"] = torch.zeros(2, 2, 3, 3)
    save_file(state, str(files["shape"]), metadata=metadata)
    save_file(good.model.state_dict(), str(files["future"]), metadata=dict(metadata, format_version=str(FORMAT_VERSION + 1)))
    Image.new("RGB", (4, 4)).save(files["image"], format="PNG")
    files["pickle"] = folder / "model.pt"
    files["pickle"].write_bytes(pickle.dumps(_Marker(folder / "UNPICKLED")))
    files["torch_save"] = folder / "weights.pt"
    torch.save({"w": torch.zeros(2)}, files["torch_save"])
    run_dir = folder / "run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    files["run_folder"] = run_dir
    return files


CHECKPOINT_CASES = {
    "random": ("not a readable safetensors file", "give a vaetool .safetensors checkpoint"),
    "empty": ("is empty", "expected a vaetool .safetensors checkpoint"),
    "truncated": ("not a readable safetensors file", "truncated"),
    "foreign": ("not a vaetool checkpoint", "written by `vaetool train`"),
    "shape": ("does not match its own config", "decoder.out.weight has shape (2, 2, 3, 3)"),
    "future": ("newer than this vaetool", "upgrade vaetool"),
    "image": ("is a PNG image, not a checkpoint", ".safetensors"),
    "pickle": ("is a PyTorch pickle", "never unpickles"),
    "torch_save": ("is a PyTorch pickle", "never unpickles"),
    "run_folder": ("not a readable safetensors file", "model.safetensors"),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_CASES))
def test_bad_checkpoints_are_one_line_errors(bad_checkpoints, blob_folder, tmp_path, kind):
    path = bad_checkpoints[kind]
    for args in (["info", path], ["reconstruct", path, blob_folder, "-o", tmp_path / "r"],
                 ["denoise", path, blob_folder, "-o", tmp_path / "d"]):
        result = invoke(*args)
        assert result.exit_code == 1 and result.stdout == "", result.output
        one_error_line(result, str(path), *CHECKPOINT_CASES[kind])
    assert not (tmp_path / "r").exists() or visible_files(tmp_path / "r") == []
    assert visible_files(tmp_path / "d") == []


def test_vaetool_files_of_another_kind_are_named(ckpt, blob_folder, tmp_path):
    run_dir = tmp_path / "run"
    assert invoke("train", blob_folder, "-o", run_dir, "--steps", 1, *TINY_ARGS, "--no-report").exit_code == 0
    assert invoke("encode", run_dir, blob_folder, "-o", tmp_path / "z.safetensors", "-q").exit_code == 0
    state = invoke("info", run_dir / "state.safetensors")
    one_error_line(state, "training state (for --resume), not a model")
    latents = invoke("info", tmp_path / "z.safetensors")
    one_error_line(latents, "latents file", "not a model")


def test_nothing_ever_unpickles_user_data(bad_checkpoints, blob_folder, tmp_path, monkeypatch):
    # 1. The source never calls an unpickler on anything.
    risky = re.compile(r"torch\.load\(|pickle\.loads?\(|Unpickler|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                       r"np\.load\((?![^)]*allow_pickle=False)")
    offenders = [f"{path}:{n}" for path in (ROOT / "vaetool").rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1) if risky.search(line)]
    assert offenders == []
    # 2. At run time, with every unpickler booby-trapped, pickles given as checkpoint, state or latents.
    def trap(*args, **kwargs):
        raise AssertionError("something tried to unpickle user data")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, trap)
    marker = bad_checkpoints["pickle"].with_name("UNPICKLED")
    evil = bad_checkpoints["pickle"]
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(evil, run_dir / "state.safetensors")
    shutil.copy(evil, run_dir / "model.safetensors")
    cases = [
        (["info", evil], "pickle"),
        (["decode", run_dir, tmp_path / "x.npy", "-o", tmp_path / "d"], "pickle"),
        (["train", blob_folder, "-o", run_dir, "--resume", *TINY_ARGS], "pickle"),
        (["interpolate", evil, f"{evil}:0", f"{evil}:1", "-o", tmp_path / "i"], "pickle"),
    ]
    for args, needle in cases:
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        one_error_line(result, needle)
    assert not marker.exists()
    # a pickled NumPy array given as latents is refused too
    ckpt_dir = tmp_path / "m"
    torch.manual_seed(0)
    save_model(ckpt_dir / "model.safetensors", VAE(ModelConfig(image_size=16, widths=(8, 16), latent_dim=4)))
    result = invoke("decode", ckpt_dir, objects, "-o", tmp_path / "d2")
    assert result.exit_code == 1 and result.stdout == ""
    one_error_line(result, str(objects), "not a readable .npy array")


# ---------------------------------------------------------------------------------------- latents


def test_bad_latents_are_refused(ckpt, tmp_path):
    wide = tmp_path / "wide.safetensors"
    save_file({"mu": torch.zeros(3, 7)}, str(wide))
    np.save(tmp_path / "wide.npy", np.zeros((2, 5), dtype=np.float32))
    nan = tmp_path / "nan.safetensors"
    values = torch.zeros(3, 4)
    values[1, 2] = float("nan")
    save_file({"mu": values}, str(nan))
    inf = tmp_path / "inf.npy"
    np.save(inf, np.array([[0.0, np.inf, 0.0, 0.0]], dtype=np.float32))
    cases = [(wide, ("7-dimensional", "latent_dim is 4")), (tmp_path / "wide.npy", ("5-dimensional", "latent_dim is 4")),
             (nan, ("NaN or infinite",)), (inf, ("NaN or infinite",))]
    for path, needles in cases:
        result = invoke("decode", ckpt, path, "-o", tmp_path / "out")
        assert result.exit_code == 1 and result.stdout == ""
        one_error_line(result, str(path), *needles)
        anchor = invoke("interpolate", ckpt, f"{path}:0", f"{path}:0", "-o", tmp_path / "frames")
        assert anchor.exit_code == 1 and anchor.stdout == ""
        one_error_line(anchor, str(path), *needles[:1])
    assert visible_files(tmp_path / "out") == [] and visible_files(tmp_path / "frames") == []


# ---------------------------------------------------------------------------------------- options


OUT_OF_RANGE = [
    ["sample", "{ckpt}", "-o", "{out}", "-n", "-1"],
    ["sample", "{ckpt}", "-o", "{out}", "-n", "0"],
    ["sample", "{ckpt}", "-o", "{out}", "--temperature", "0"],
    ["sample", "{ckpt}", "-o", "{out}", "--temperature", "-1"],
    ["sample", "{ckpt}", "-o", "{out}", "--temperature", "nan"],
    ["sample", "{ckpt}", "-o", "{out}", "--temperature", "inf"],
    ["sample", "{ckpt}", "-o", "{out}", "--batch-size", "-2"],
    ["train", "{data}", "-o", "{out}", "--steps", "0"],
    ["train", "{data}", "-o", "{out}", "--steps", "-5"],
    ["train", "{data}", "-o", "{out}", "--epochs", "0"],
    ["train", "{data}", "-o", "{out}", "--batch-size", "0"],
    ["train", "{data}", "-o", "{out}", "--lr", "0"],
    ["train", "{data}", "-o", "{out}", "--lr", "nan"],
    ["train", "{data}", "-o", "{out}", "--time", "0s"],
    ["train", "{data}", "-o", "{out}", "--val-fraction", "1"],
    ["train", "{data}", "-o", "{out}", "--widths", "8,-16"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--overlap", "1"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--overlap", "1.5"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--overlap", "-0.1"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--tile", "0"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--strength", "1.5"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--workers", "0"],
    ["denoise", "{ckpt}", "{data}", "-o", "{out}", "--batch-size", "-1"],
    ["interpolate", "{ckpt}", "a.png", "b.png", "-o", "{out}", "--steps", "0"],
    ["traverse", "{ckpt}", "-o", "{out}/t.png", "--steps", "0"],
    ["traverse", "{ckpt}", "-o", "{out}/t.png", "--rows", "-1"],
    ["traverse", "{ckpt}", "-o", "{out}/t.png", "--range", "nan"],
    ["encode", "{ckpt}", "{data}", "-o", "{out}/z.safetensors", "--batch-size", "0"],
    ["reconstruct", "{ckpt}", "{data}", "-o", "{out}", "--batch-size", "-3"],
]


@pytest.mark.parametrize("args", OUT_OF_RANGE, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_out_of_range_options_are_usage_errors(ckpt, blob_folder, tmp_path, args):
    result = invoke(*[a.format(ckpt=ckpt, data=blob_folder, out=tmp_path / "out") for a in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert "Invalid value" in result.stderr or "Usage" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- property-based conversions


def _synthetic(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.uniform(-2, 300, (height, width)).astype(np.float32), "F")
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(colors=int(rng.integers(2, 40)))
    if mode == "PA":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
        return image
    if mode in ("RGBA", "LA"):
        image = rgb.convert(mode)
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
        return image
    return rgb.convert(mode)


FORMATS = {"1": ".png", "L": ".png", "LA": ".png", "P": ".png", "PA": ".png", "RGB": ".jpg", "RGBA": ".webp",
           "I;16": ".png", "F": ".tif", "CMYK": ".jpg", "YCbCr": ".jpg"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(sorted(FORMATS)), width=st.integers(1, 120), height=st.integers(1, 40),
       transpose=st.booleans(), model_channels=st.sampled_from([1, 3]), size=st.sampled_from([8, 16]),
       seed=st.integers(0, 2**16))
def test_any_mode_size_and_depth_converts_to_the_model(tmp_path, mode, width, height, transpose, model_channels,
                                                       size, seed):
    if transpose:
        width, height = height, width
    path = tmp_path / f"x{FORMATS[mode]}"
    _synthetic(mode, width, height, seed).save(path)
    # training and latent commands: exactly the model's channels and size, uint8
    tensor = load_image(path, image_size=size, channels=model_channels)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (model_channels, size, size)
    # denoise: native size; through the model's channels and back with an identity model, nothing is lost
    decoded = read_image(path)
    assert decoded.bit_depth == (16 if mode in ("I;16", "F") else 8)
    assert decoded.pixels.shape[1:] == (height, width) and decoded.pixels.shape[0] in (1, 3)
    assert 0.0 <= float(decoded.pixels.min()) and float(decoded.pixels.max()) <= 1.0
    inputs, layout = split_image(decoded.pixels, model_size=size, model_channels=model_channels, tile=size)
    assert tuple(inputs.shape[1:]) == (model_channels, size, size)
    back = join_outputs(inputs, layout)
    assert back.shape == decoded.pixels.shape
    torch.testing.assert_close(back, decoded.pixels, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 200), width=st.integers(1, 200), tile=st.sampled_from([2, 5, 8, 16, 32]),
       overlap=st.floats(0.0, 0.95), channels=st.sampled_from([1, 3]))
def test_tiling_covers_every_pixel_exactly_once_after_blending(height, width, tile, overlap, channels):
    plan = plan_tiles(height, width, tile=tile, overlap=overlap)
    assume(plan.num_tiles <= 1500)  # stride-1 plans of big images only cost time, they test nothing new
    # each pixel's value is its own index: a pixel counted twice, or taken from a neighbour, shows
    index = torch.arange(height * width, dtype=torch.float64).reshape(1, height, width).expand(channels, -1, -1)
    out = blend_tiles(extract_tiles(index.contiguous(), plan), plan)
    assert out.shape == (channels, height, width)
    assert torch.equal(out.round(), index)
    torch.testing.assert_close(out, index, atol=1e-6 * height * width, rtol=0)
    ones = blend_tiles(torch.ones(plan.num_tiles, 1, tile, tile, dtype=torch.float64), plan)
    torch.testing.assert_close(ones, torch.ones(1, height, width, dtype=torch.float64), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ faults


SAVER = """
import sys, torch
from vaetool.checkpoint import save_model
from vaetool.config import ModelConfig
from vaetool.models.vector import VAE
torch.manual_seed(0)
model = VAE(ModelConfig(image_size=32, widths=(16, 32, 64), latent_dim=16))
k = 0
while True:
    k += 1
    with torch.no_grad():
        model.decoder.out.bias.fill_(float(k))
    save_model(sys.argv[1], model, training={"save": k})
    print(k, flush=True)
"""


def test_kill_9_while_writing_checkpoints_never_costs_the_previous_one(tmp_path):
    rng = random.Random(8)
    target = tmp_path / "model.safetensors"
    for round_ in range(4):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True,
                                 env=SUB_ENV)
        saved = [int(saver.stdout.readline())]  # at least one complete save before the kill
        time.sleep(rng.uniform(0.0, 0.4))
        saver.send_signal(signal.SIGKILL)
        saved += [int(line) for line in saver.stdout.read().split()]
        saver.wait()
        loaded = load_model(target)  # the final name always holds a whole checkpoint
        number = loaded.training["save"]
        assert number in (saved[-1], saved[-1] + 1), (number, saved[-1])  # the last one, or one in flight
        assert torch.all(loaded.model.decoder.out.bias == number)  # never a mix of two saves
        names = [p.name for p in tmp_path.iterdir()]
        assert [n for n in names if not n.startswith(".")] == ["model.safetensors"], names
        assert all(n.startswith((".model.safetensors.tmp-", ".tmp")) for n in names if n.startswith(".")), names
        for leftover in tmp_path.glob(".*"):
            leftover.unlink()  # a crash leaves hidden temporary files only; tidy for the next round
    assert round_ == 3


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).model.state_dict()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigint_mid_step_saves_a_state_that_resumes_to_the_same_weights(blob_folder, tmp_path, monkeypatch):
    """Ctrl-C landing right after the optimizer update, before the step is counted (the worst moment)."""
    from vaetool.training import trainer

    signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left: Ctrl-C as a user has it

    args = [*TINY_ARGS, "--no-report", "--ema", "0.9", "--seed", "4"]
    whole = invoke("train", blob_folder, "-o", tmp_path / "whole", "--steps", 8, *args)
    assert whole.exit_code == 0, whole.output
    real_update, updates = trainer.update_ema, []

    def update_then_sigint(*args, **kwargs):
        real_update(*args, **kwargs)
        updates.append(1)
        if len(updates) == 3:  # the third update is done, its counter not yet
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "update_ema", update_then_sigint)
    cut = invoke("train", blob_folder, "-o", tmp_path / "cut", "--steps", 8, *args)
    assert cut.exit_code == 130 and cut.stdout == ""
    assert "resumable state saved" in cut.stderr and "Traceback" not in cut.stderr
    assert "error: interrupted" not in cut.stderr  # one message, the warning
    monkeypatch.setattr(trainer, "update_ema", real_update)
    assert ckpt_module.load_state(tmp_path / "cut" / "state.safetensors")[1]["progress"]["step"] == 3
    resumed = invoke("train", blob_folder, "-o", tmp_path / "cut", "--steps", 8, "--resume", *args)
    assert resumed.exit_code == 0, resumed.output
    _assert_same_weights(_weights(tmp_path / "whole" / "last.safetensors"), _weights(tmp_path / "cut" / "last.safetensors"))


def test_sigint_before_training_starts_claims_no_saved_state(blob_folder, tmp_path, monkeypatch):
    import vaetool.io.cache

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaetool.io.cache, "build_cache", interrupted)
    result = invoke("train", blob_folder, "-o", tmp_path / "run", "--steps", 3, *TINY_ARGS)
    assert result.exit_code == 130 and result.stdout == ""
    assert "nothing to resume" in result.stderr and "resumable state saved" not in result.stderr
    assert not (tmp_path / "run" / "state.safetensors").exists()


def test_sigint_to_the_installed_command_exits_130_and_resumes_exactly(tmp_path):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # children inherit an ignored SIGINT: restore it
    data = tmp_path / "data"
    make_blobs(data, count=12)
    args = [*TRAIN, "--seed", "2"]
    reference = subprocess.Popen([VAETOOL, "train", data, "-o", tmp_path / "whole", "--steps", "30", *args, "-q"],
                                 env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = random.Random(1)
    for attempt in range(3):
        run_dir = tmp_path / f"cut{attempt}"
        cut = subprocess.Popen([VAETOOL, "train", data, "-o", run_dir, "--steps", "30", *args], env=SUB_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (run_dir / "state.safetensors").exists() and cut.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the first epoch is saved: training is under way
        time.sleep(rng.uniform(0.0, 0.1) / (attempt + 1))
        cut.send_signal(signal.SIGINT)
        out, err = cut.communicate(timeout=60)
        if cut.returncode != 0:  # 0: it finished before the signal came; try again sooner
            break
    assert cut.returncode == 130, err
    assert out == "" and "Traceback" not in err
    assert "resumable state saved" in err.strip().splitlines()[-1] and "error: interrupted" not in err
    step = ckpt_module.load_state(run_dir / "state.safetensors")[1]["progress"]["step"]
    assert 0 < step < 30
    resumed = subprocess.run([VAETOOL, "train", data, "-o", run_dir, "--steps", "30", "--resume", *args, "-q"],
                             env=SUB_ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=120) == 0
    _assert_same_weights(_weights(tmp_path / "whole" / "last.safetensors"), _weights(run_dir / "last.safetensors"))


def test_diverging_run_stops_with_a_fix_and_keeps_the_last_good_checkpoint(blob_folder, tmp_path):
    run_dir = tmp_path / "run"
    assert invoke("train", blob_folder, "-o", run_dir, "--steps", 3, *TINY_ARGS, "--no-report").exit_code == 0
    good = _weights(run_dir / "model.safetensors")
    result = invoke("train", blob_folder, "-o", run_dir, "--steps", 40, "--force", "--lr", "1e12",
                    "--grad-clip", "1e30", *TINY_ARGS, "--no-report")
    assert result.exit_code == 1 and result.stdout == ""
    line = one_error_line(result, "NaN or infinite", "--lr", str(run_dir / "model.safetensors"))
    assert "lower the learning rate" in line
    _assert_same_weights(good, _weights(run_dir / "model.safetensors"))


def _file_in_the_way(tmp_path: Path) -> Path:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should go\n")
    return blocker / "out"


@pytest.mark.parametrize("command", ["train", "encode", "reconstruct", "denoise", "sample", "decode"])
def test_unwritable_output_is_one_clean_error_before_any_work(ckpt, blob_folder, tmp_path, command):
    """Root writes through read-only permission bits, so the output is made unwritable another way
    that binds everyone: its parent is a regular file. (The chmod case runs as nobody, above.)"""
    out = _file_in_the_way(tmp_path)
    before = snapshot(blob_folder)
    np.save(tmp_path / "z.npy", np.zeros((2, 4), dtype=np.float32))
    args = {"train": ["train", blob_folder, "-o", out, "--steps", 1, *TINY_ARGS],
            "encode": ["encode", ckpt, blob_folder, "-o", out / "z.safetensors"],
            "reconstruct": ["reconstruct", ckpt, blob_folder, "-o", out],
            "denoise": ["denoise", ckpt, blob_folder, "-o", out],
            "sample": ["sample", ckpt, "-o", out, "-n", 3],
            "decode": ["decode", ckpt, tmp_path / "z.npy", "-o", out]}[command]
    result = invoke(*args)
    assert result.exit_code == 1 and result.stdout == ""
    one_error_line(result, "cannot write", "not_a_folder is a file, not a folder")
    assert snapshot(blob_folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "not_a_folder", "z.npy"]


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_no_partial_outputs(out: Path) -> list[Path]:
    """Every visible file is a complete image; no temporary file is left behind."""
    files = visible_files(out)
    for path in files:
        assert_valid_image(path)
    assert [p for p in out.rglob(".*")] == []
    return files


def test_disk_full_while_denoising_stops_cleanly_and_resumes(ckpt, tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_blobs(data, count=10, size=24)
    before = snapshot(data)
    out = tmp_path / "out"
    real_write = atomic_module.write_file
    calls = []

    def write_until_full(path, data, **kw):
        calls.append(path)
        if len(calls) <= 4:
            return real_write(path, data, **kw)
        Path(path).write_bytes(bytes(data)[: len(data) // 2])  # the disk fills up mid-file
        raise _disk_full()

    monkeypatch.setattr(atomic_module, "write_file", write_until_full)
    full = invoke("denoise", ckpt, data, "-o", out, "--workers", 1, "--batch-size", 4, "--device", "cpu", "-q")
    monkeypatch.undo()
    assert full.exit_code == 1, full.output
    one_error_line(full, "No space left on device", "free some space")
    written = _assert_no_partial_outputs(out)
    assert [Path(p) for p in full.stdout.splitlines()] == written and 0 < len(written) < 10
    resumed = invoke("denoise", ckpt, data, "-o", out, "--skip-existing", "--device", "cpu", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert len(_assert_no_partial_outputs(out)) == 10 and snapshot(data) == before


def test_disk_full_in_the_latent_commands_and_training(ckpt, blob_folder, tmp_path, monkeypatch):
    before = snapshot(blob_folder)

    def write_half_then_fill_up(path, data, **kw):
        with open(path, "wb") as handle:
            handle.write(bytes(data)[: len(data) // 2])
        raise _disk_full()

    monkeypatch.setattr(atomic_module, "write_file", write_half_then_fill_up)  # per-image writes of reconstruct
    rec = invoke("reconstruct", ckpt, blob_folder, "-o", tmp_path / "rec", "-q")
    assert rec.exit_code == 1 and rec.stdout == ""
    one_error_line(rec, "No space left on device")
    assert _assert_no_partial_outputs(tmp_path / "rec") == []
    monkeypatch.undo()

    run_dir = tmp_path / "run"
    assert invoke("train", blob_folder, "-o", run_dir, "--steps", 5, *TINY_ARGS, "--no-report").exit_code == 0
    kept = {name: (run_dir / name).read_bytes() for name in ("model.safetensors", "last.safetensors",
                                                             "state.safetensors")}

    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(atomic_module, "save_file", save_file_on_a_full_disk)  # how safetensors reports ENOSPC
    more = invoke("train", blob_folder, "-o", run_dir, "--steps", 10, "--resume", *TINY_ARGS, "--no-report")
    assert more.exit_code == 1 and more.stdout == ""
    one_error_line(more, "No space left on device", str(run_dir))
    encode = invoke("encode", ckpt, blob_folder, "-o", tmp_path / "z.safetensors", "-q")
    assert encode.exit_code == 1 and encode.stdout == ""
    one_error_line(encode, "No space left on device", str(tmp_path / "z.safetensors"))
    monkeypatch.undo()
    assert not (tmp_path / "z.safetensors").exists() and not list(tmp_path.glob(".*"))
    for name, data in kept.items():  # the previous checkpoints are whole and unchanged
        assert (run_dir / name).read_bytes() == data, name
    assert not [p for p in run_dir.glob(".*")]
    assert snapshot(blob_folder) == before


def test_interrupted_denoise_then_skip_existing_completes_the_set(ckpt, tmp_path):
    data = tmp_path / "data"
    make_blobs(data, count=30, size=48)
    make_blobs(data / "sub", count=10, size=40, seed=3, mode="L")
    total = 40
    out = tmp_path / "out"
    first = subprocess.Popen([VAETOOL, "denoise", ckpt, data, "-o", out, "--device", "cpu", "--workers", "1",
                              "--batch-size", "2", "-q"], env=SUB_ENV, stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert first.stdout.readline()  # some outputs are written: the run is under way
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    partial = _valid_visible(out)
    assert 3 <= len(partial) < total  # it was cut off part way
    partial[0].write_bytes(b"")  # and a power cut emptied one whose data never reached the disk
    second = invoke("denoise", ckpt, data, "-o", out, "--skip-existing", "--device", "cpu")
    assert second.exit_code == 0, second.output
    assert f"skipped {len(partial) - 1}, failed 0 (of {total})" in second.stderr
    assert len(second.stdout.splitlines()) == total - len(partial) + 1 and str(partial[0]) in second.stdout
    clean = invoke("denoise", ckpt, data, "-o", tmp_path / "clean", "--device", "cpu", "-q")
    assert clean.exit_code == 0
    finished = _valid_visible(out)
    assert [p.relative_to(out) for p in finished] == [p.relative_to(tmp_path / "clean")
                                                      for p in visible_files(tmp_path / "clean")]
    for path in finished:
        mine = np.asarray(assert_valid_image(path), dtype=np.int16)
        reference = np.asarray(assert_valid_image(tmp_path / "clean" / path.relative_to(out)), dtype=np.int16)
        assert mine.shape == reference.shape and np.abs(mine - reference).max() <= 1, path


def _valid_visible(out: Path) -> list[Path]:
    files = visible_files(out)
    for path in files:
        assert_valid_image(path)  # a killed run leaves whole files or none under final names
    return files
