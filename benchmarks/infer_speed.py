"""End-to-end speed and peak memory of `vaetool encode` / `reconstruct` / `sample`, against the model's pure
forward-pass throughput on in-memory tensors at the same batch size, measured in the same run.

    python benchmarks/infer_speed.py [--count 10000] [--small 640] [--batch-size 64] [--commands encode,reconstruct,sample]

Each command runs as the installed `vaetool` in a fresh process, once on a small folder and once on the
full one; the steady-state rate is (count - small) / (t_full - t_small), which cancels the start-up
(Python, torch, checkpoint) that any command pays once. CPU milliseconds per image (all threads) are
reported beside wall-clock rates, because on a shared machine they are far less disturbed by other
processes: a CPU ratio near 1 means the pipeline adds almost no work beside the model. Peak RSS is each child's own (wait4), so the
small and full runs show whether memory stays flat in folder size. The folder is the built-in faces at
64x64 and the model the default architecture, untrained (weights do not change the speed).
"""

from __future__ import annotations

import argparse
import os
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
    """A folder of `count` 64x64 face PNGs, generated once and reused."""
    from faces import make_faces

    if len(list(folder.glob("*.png"))) != count:
        shutil.rmtree(folder, ignore_errors=True)
        make_faces(folder, count=count, size=64, seed=1)
    return folder


def cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def in_memory_batch(folder: Path, model, batch: int) -> torch.Tensor:
    """The folder's first images as one float batch (B, C, S, S), channels_last: the same pixels the command
    sees (random noise would not do: an untrained model's speed depends on its activations' values)."""
    from vaetool.images import find_images, load_image

    cfg = model.config
    found = find_images([folder])[:batch]
    x = torch.stack([load_image(f.path, image_size=cfg.image_size, channels=cfg.channels) for f in found])
    return (x.float() / 255).contiguous(memory_format=torch.channels_last)


def forward_rate(model, command: str, x: torch.Tensor, seconds: float = 4.0) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the bare model on one in-memory batch: the command's ceiling."""
    batch = len(x)
    z = torch.randn(batch, model.config.latent_dim, generator=torch.Generator().manual_seed(0))  # as `sample`
    steps = {"encode": lambda: model.encode(x),
             "sample": lambda: model.mean_image(model.decode(z)),
             "reconstruct": lambda: model.mean_image(model.decode(model.encode(x).mu))}
    run = steps[command]
    with torch.inference_mode():
        run(), run()  # warm-up: allocator and kernel selection
        count, start, cpu = 0, time.perf_counter(), cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
        while time.perf_counter() - start < seconds:
            run()
            count += 1
    cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - cpu
    return count * batch / (time.perf_counter() - start), 1000 * cpu / (count * batch)


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of one child process: its own, not the max over all children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return seconds, cpu_seconds(usage), usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def command_line(command: str, ckpt: Path, folder: Path, count: int, out: Path, batch: int) -> list[str]:
    if command == "encode":
        cmd = [VAETOOL, "encode", str(ckpt), str(folder), "-o", f"{out}.safetensors"]
    elif command == "sample":
        cmd = [VAETOOL, "sample", str(ckpt), "-n", str(count), "-o", str(out)]
    else:
        cmd = [VAETOOL, command, str(ckpt), str(folder), "-o", str(out)]
    return cmd + ["--batch-size", str(batch), "--device", "cpu", "-q", "--force"]


def measure(command: str, ckpt: Path, model, folders: dict[int, Path], work: Path, batch: int) -> dict[str, float]:
    """End-to-end runs on the small and full folders, with the forward-only rate measured around them."""
    x = in_memory_batch(folders[max(folders)], model, batch)
    before = forward_rate(model, command, x)
    (small, full) = sorted(folders)
    results = {}
    for count in (small, full):
        out = work / f"{command}-{count}"
        results[count] = timed(command_line(command, ckpt, folders[count], count, out, batch))
        shutil.rmtree(out, ignore_errors=True)
        Path(f"{out}.safetensors").unlink(missing_ok=True)
    after = forward_rate(model, command, x)
    steady = (full - small) / max(results[full][0] - results[small][0], 1e-9)
    steady_cpu = 1000 * (results[full][1] - results[small][1]) / (full - small)
    return {"steady": steady, "whole": full / results[full][0], "bare": (before[0] + after[0]) / 2,
            "cpu": steady_cpu, "bare_cpu": (before[1] + after[1]) / 2, "rss_small": results[small][2],
            "rss_full": results[full][2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="images in the full folder")
    parser.add_argument("--small", type=int, default=640, help="images in the small folder (start-up baseline)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--commands", default="encode,reconstruct,sample")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where the face folders are kept")
    args = parser.parse_args()
    from vaetool.checkpoint import save_model
    from vaetool.config import ModelConfig
    from vaetool.model import VAE
    from vaetool.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as the commands do (runtime.prepare)
    work = Path(tempfile.mkdtemp(prefix="vaetool-infer-"))
    torch.manual_seed(0)
    model = VAE(ModelConfig()).eval().to(memory_format=torch.channels_last)
    ckpt = save_model(work / "model.safetensors", model)
    folders = {n: faces(args.data / f"faces{n}", n) for n in (args.small, args.count)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"64x64 RGB, default model; load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'command':12s} {'steady img/s':>12s} {'whole-run img/s':>15s} {'forward img/s':>13s} {'ratio':>6s} "
          f"{'CPU ms/img':>10s} {'forward CPU':>11s} {'ratio':>6s} {f'RSS MiB @{args.small}':>14s} "
          f"{f'RSS MiB @{args.count}':>15s}")
    for command in args.commands.split(","):
        r = measure(command, ckpt, model, folders, work, args.batch_size)
        print(f"{command:12s} {r['steady']:12.1f} {r['whole']:15.1f} {r['bare']:13.1f} {r['steady'] / r['bare']:6.2f} "
              f"{r['cpu']:10.2f} {r['bare_cpu']:11.2f} {r['bare_cpu'] / r['cpu']:6.2f} {r['rss_small']:14.0f} "
              f"{r['rss_full']:15.0f}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes on the machine distort every figure)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
