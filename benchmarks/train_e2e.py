"""End-to-end training speed on a folder, against compute-only speed and against a plain training loop.

    python benchmarks/train_e2e.py [--count 20000] [--plain-steps 60] [--data bench-data/faces20k]

Measures, in one run:
  1. first `vaetool train` epoch: decoding throughput (all cores) and total time;
  2. second epoch: end-to-end images/s (including validation, grids and checkpoints at its end);
  3. compute-only images/s of the same step on in-memory tensors (same batch);
  4. a second `train` on the unchanged folder: seconds until the first step (on-disk cache reused);
  5. a plain loop written the way pytorch/examples' VAE is (ImageFolder + transforms, DataLoader, Adam,
     `.item()` every step, default allocator) over the same folder and architecture, in a fresh process.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PLAIN_LOOP = r'''
import resource, sys, time, torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from vaetool.config import ModelConfig
from vaetool.models.base import elbo_loss
from vaetool.models.vector import VAE
root, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
data = datasets.ImageFolder(root, transform=transforms.ToTensor())   # needs a class subfolder
loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=0)
model = VAE(ModelConfig())
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
done, start = 0, None
while done < steps:
    for x, _ in loader:
        optimizer.zero_grad()
        out = model(x)
        loss = elbo_loss(model, x, out).loss
        loss.backward()
        train_loss = loss.item()          # a host sync every step, as in the example
        optimizer.step()
        done += 1
        if done == 5:
            start = time.perf_counter()    # after warm-up
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if done >= steps:
            break
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (steps - 5)
print(faults)
print((steps - 5) * batch / (time.perf_counter() - start))
'''


def make_data(folder: Path, count: int) -> Path:
    from faces import make_faces

    marker = folder / "class0"  # ImageFolder wants one subfolder per class; vaetool does not care
    if not (marker.exists() and len(list(marker.glob("*.png"))) >= count):
        shutil.rmtree(folder, ignore_errors=True)
        make_faces(marker, count=count, size=64, seed=0)
        (marker / "attributes.csv").unlink(missing_ok=True)
    return folder


def run_vaetool(data: Path, run_dir: Path, cache_dir: Path, *, epochs: int) -> dict:
    from vaetool.config import ModelConfig, TrainConfig
    from vaetool.training.trainer import train

    marks: dict = {"epochs": []}
    def cpu() -> float:  # this process and its finished children (the decoding workers)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    start, cpu_start = time.perf_counter(), cpu()

    def callback(event) -> None:  # vaetool.events payloads
        now = time.perf_counter() - start
        kind = type(event).__name__
        if kind == "Started" and event.command == "train":
            info = event.info
            marks["start"] = now
            marks["start_cpu"] = cpu() - cpu_start  # all threads and worker processes: cores busy while decoding
            marks["train_images"] = info["train"]
            marks["reused"] = info["cache_reused"]
            marks["precision"] = info["precision"]
        elif kind == "Progress" and event.metrics and "first_step" not in marks:
            marks["first_step"] = now
        elif kind == "Epoch":
            marks["epochs"].append(now)
            marks.setdefault("faults", []).append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt, event.step))

    train([data], run_dir, model_config=ModelConfig(), train_config=TrainConfig(epochs=epochs, log_every=25),
          device="cpu", cache_dir=cache_dir, force=True, callback=callback)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--plain-steps", type=int, default=60)
    parser.add_argument("--compute-seconds", type=float, default=30.0)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data" / "faces20k")
    args = parser.parse_args()
    data = make_data(args.data, args.count)
    work = Path(tempfile.mkdtemp(prefix="vaetool-bench-"))
    cache = work / "cache"

    from train_speed import measure_training
    from vaetool.config import ModelConfig

    plain_faults: list[float] = []

    def plain_loop() -> float:
        plain = subprocess.run([sys.executable, "-c", PLAIN_LOOP, str(data), str(args.plain_steps), "64"],
                               capture_output=True, text=True, check=True)
        *_, faults, rate = plain.stdout.strip().splitlines()
        plain_faults.append(float(faults))
        return float(rate)

    # Compute-only and the plain loop are measured before and after the vaetool runs: A B A on a noisy machine.
    compute_before, _ = measure_training(ModelConfig(), batch=64, seconds=args.compute_seconds)
    plain_before = plain_loop()
    first = run_vaetool(data, work / "run1", cache, epochs=2)
    epoch2 = first["epochs"][1] - first["epochs"][0]
    e2e = first["train_images"] // 64 * 64 / epoch2
    second = run_vaetool(data, work / "run2", cache, epochs=1)
    compute_after, _ = measure_training(ModelConfig(), batch=64, seconds=args.compute_seconds)
    plain_after = plain_loop()
    compute = (compute_before + compute_after) / 2
    plain_rate = (plain_before + plain_after) / 2
    print(f"images                              {args.count}")
    print(f"first run: start of training after  {first['start']:.1f} s (decoding every image once: "
          f"{args.count / first['start']:.0f} images/s, {first['start_cpu'] / first['start']:.2f} cores busy "
          f"of {os.cpu_count()})")
    print(f"first epoch (incl. decode)          {first['epochs'][0]:.1f} s")
    print(f"second epoch end to end             {epoch2:.1f} s = {e2e:.1f} images/s")
    print(f"compute only (in-memory tensors)    {compute:.1f} images/s (before {compute_before:.1f}, after "
          f"{compute_after:.1f}; {first['precision']}, as vaetool trained) -> end to end is {100 * e2e / compute:.1f}%")
    print(f"second run: training starts after   {second['start']:.1f} s (cache reused: {second['reused']})")
    print(f"plain pytorch/examples-style loop   {plain_rate:.1f} images/s (before {plain_before:.1f}, after "
          f"{plain_after:.1f}) -> vaetool is {e2e / plain_rate:.2f}x")
    (f1, s1), (f2, s2) = first["faults"][:2]
    print(f"minor page faults per step          vaetool {(f2 - f1) / max(s2 - s1, 1):.0f} (second epoch), "
          f"plain loop {sum(plain_faults) / len(plain_faults):.0f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
