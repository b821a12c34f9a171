"""DDP under torchrun (gloo on CPU) matches one process with the global batch; the memory-mapped cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_blobs
from vaetool.checkpoint import load_model
from vaetool.config import ModelConfig, TrainConfig
from vaetool.events import Started
from vaetool.training.trainer import train

COMMON = ["--steps", "4", "--val-fraction", "0.2", "--log-every", "1", "--image-size", "16", "--widths", "8,16",
          "--latent-dim", "4", "--device", "cpu", "-q"]
# Each family's smallest settings: spatial a 4x4 map, hierarchical a top vector and maps at 1/4 and 1/2.
FAMILY_ARGS = {"vector": ["--model", "vector"], "spatial": ["--model", "spatial", "--latent-channels", "2", "--downsample", "4"],
               "hierarchical": ["--model", "hierarchical", "--latent-channels", "2", "--downsample", "2"]}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", VAETOOL_CACHE_DIR="")
    env.pop("VAETOOL_DEBUG", None)
    return env


def _torchrun(tmp_path, *args, installed: bool = False):
    """`torchrun -m vaetool ...`, or with `installed` the installed torchrun running the installed `vaetool` script."""
    bin_dir = Path(sys.executable).parent
    launcher = [str(bin_dir / "torchrun")] if installed else [sys.executable, "-m", "torch.distributed.run"]
    program = [str(bin_dir / "vaetool")] if installed else ["-m", "vaetool"]
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", *program, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, family):
    data = tmp_path / "data"
    make_blobs(data, count=20)
    ddp = _torchrun(tmp_path, "train", str(data), "-o", str(tmp_path / "ddp"), "--batch-size", "2",
                    "--cache-dir", str(tmp_path / "cache"), *COMMON, *FAMILY_ARGS[family])
    assert ddp.returncode == 0, ddp.stderr
    # only rank 0 prints the result, and the checkpoint loads in a single process
    assert ddp.stdout.strip().splitlines() == [str(tmp_path / "ddp" / "model.safetensors")]
    single = subprocess.run([sys.executable, "-m", "vaetool", "train", str(data), "-o", str(tmp_path / "one"),
                             "--batch-size", "4", "--no-disk-cache", *COMMON, *FAMILY_ARGS[family]],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert single.returncode == 0, single.stderr
    ddp_model = load_model(tmp_path / "ddp" / "last.safetensors")
    one_model = load_model(tmp_path / "one" / "last.safetensors")
    assert ddp_model.config.kind == one_model.config.kind == family
    a, b = ddp_model.model.state_dict(), one_model.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-3, rtol=1e-3, msg=key)
    if family != "vector":
        return  # resume is per family in test_train_families; under torchrun once, to keep this file fast
    # resume under torchrun continues the distributed run (here the installed torchrun and vaetool commands)
    more = _torchrun(tmp_path, "train", str(data), "-o", str(tmp_path / "ddp"), "--batch-size", "2",
                     "--cache-dir", str(tmp_path / "cache"), *COMMON[:1], "6", *COMMON[2:], *FAMILY_ARGS[family],
                     "--resume", installed=True)
    assert more.returncode == 0, more.stderr
    assert load_model(tmp_path / "ddp" / "last.safetensors").training["step"] == 6


def test_memory_mapped_cache_gives_the_same_training(tmp_path):
    data = tmp_path / "data"
    make_blobs(data, count=10)
    config = TrainConfig(steps=3, batch_size=2, val_fraction=0.2, log_every=1)
    model = ModelConfig(image_size=16, latent_dim=4, widths=(8, 16))
    kw = dict(model_config=model, train_config=config, device="cpu")
    events = []
    train([data], tmp_path / "ram", cache_dir=None, **kw)
    train([data], tmp_path / "disk", cache_dir=tmp_path / "cache", cache_memory=1,
          callback=lambda e: events.append(e.info) if isinstance(e, Started) and e.command == "train" else None, **kw)
    assert events[0]["cache_on_disk"]
    a = load_model(tmp_path / "ram" / "last.safetensors").model.state_dict()
    b = load_model(tmp_path / "disk" / "last.safetensors").model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
