"""End-to-end inference speed and peak memory of `vaetool encode` / `reconstruct` / `sample` / `denoise`,
against the model's pure forward throughput on in-memory tensors measured in the same run.

    python benchmarks/infer_speed.py [--counts 2000,10000] [--batch-size 64] [--commands encode,reconstruct]

Each command runs as the installed `vaetool` in a fresh process; its peak RSS comes from getrusage.
The folder is the built-in faces at 64x64; the model is the default architecture (weights do not
change the speed, so an untrained checkpoint is used).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
VAETOOL = str(Path(sys.executable).with_name("vaetool"))


def faces(folder: Path, count: int) -> Path:
    from faces import make_faces

    if len(list(folder.glob("*.png"))) < count:
        shutil.rmtree(folder, ignore_errors=True)
        make_faces(folder, count=count, size=64, seed=1)
    return folder


def forward_rate(model, kind: str, batch: int, seconds: float = 8.0) -> float:
    """Images/s of the bare model on an in-memory batch: encoder only, or encoder + decoder."""
    x = torch.rand(batch, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    z = torch.randn(batch, model.config.latent_dim)

    def run():
        if kind == "encode":
            model.encode(x)
        elif kind == "sample":
            model.mean_image(model.decode(z))
        else:
            model.mean_image(model.decode(model.encode(x).mu))

    with torch.inference_mode():
        run()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            count += 1
    return count * batch / (time.perf_counter() - start)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def startup_seconds() -> float:
    """Time of a command that loads torch and the checkpoint but processes nothing (subtracted)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, vaetool.ops"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="2000,10000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--commands", default="encode,reconstruct,sample")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    args = parser.parse_args()
    from vaetool.checkpoint import save_model
    from vaetool.config import ModelConfig
    from vaetool.model import VAE
    from vaetool.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    work = Path(tempfile.mkdtemp(prefix="vaetool-infer-"))
    torch.manual_seed(0)
    model = VAE(ModelConfig()).eval().to(memory_format=torch.channels_last)
    ckpt = save_model(work / "model.safetensors", model)
    startup = startup_seconds()
    print(f"start-up (python + torch + vaetool import): {startup:.2f} s, subtracted from each run")
    print(f"{'command':12s} {'images':>7s} {'end-to-end img/s':>17s} {'forward-only img/s':>19s} {'ratio':>6s} {'peak RSS MiB':>13s}")
    for count in [int(c) for c in args.counts.split(",")]:
        folder = faces(args.data / f"faces{count}", count)
        for command in args.commands.split(","):
            out = work / f"{command}-{count}"
            if command == "encode":
                cmd = [VAETOOL, "encode", str(ckpt), str(folder), "-o", str(out) + ".safetensors", "-q"]
            elif command == "sample":
                cmd = [VAETOOL, "sample", str(ckpt), "-n", str(count), "-o", str(out), "-q"]
            else:
                cmd = [VAETOOL, command, str(ckpt), str(folder), "-o", str(out), "-q"]
            cmd += ["--batch-size", str(args.batch_size), "--device", "cpu"]
            seconds, rss = timed(cmd)
            rate = count / max(seconds - startup, 1e-9)
            bare = forward_rate(model, command if command in ("encode", "sample") else "reconstruct", args.batch_size)
            print(f"{command:12s} {count:7d} {rate:17.1f} {bare:19.1f} {rate / bare:6.2f} {rss:13.0f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
