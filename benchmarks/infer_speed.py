"""End-to-end speed and peak memory of `vaetool encode` / `reconstruct` / `sample`, against the model's pure
forward-pass throughput on in-memory tensors at the same batch size, measured in the same run.

    python benchmarks/infer_speed.py [--count 10000] [--small 640] [--batch-size 64] [--rounds 5]

Two measurements per command:

1. The installed `vaetool` in a fresh process, on a small folder and on the full one. The steady rate
   is (count - small) / (t_full - t_small), which cancels the start-up (Python, torch, checkpoint) that
   any command pays once. Peak RSS is each child's own (wait4): small vs full shows whether memory
   stays flat in folder size. The child's user and kernel CPU per image (same difference) show how much
   of the work is the operating system's: creating, writing and renaming thousands of small files.
2. How close end to end comes to compute only: in this process, rounds that alternate the engine's
   streaming pass (decode on worker threads, model, background writes) over `--small` images with the
   bare model over the same number of images held in memory. Each round gives a ratio of rates;
   adjacent passes share the machine's load. The CPU time of each pass (all threads) is reported
   too: its ratio is the share of the work that is the model's, which is what bounds the rate on a
   machine whose cores are all busy. On a shared machine, run with OMP_WAIT_POLICY=PASSIVE so that
   OpenMP threads spinning while descheduled do not count as work; there, wall-clock ratios above 1
   can appear because the scheduler shares CPU per thread and the engine runs more threads.

The folder is the built-in faces at 64x64 and the model the default of a family (`--model`), trained for
`--train-seconds` on the small folder (or `--checkpoint`): the weights do not change the amount of
arithmetic, but they change what is written, and an untrained model's grey noise costs the PNG
compressor more than faces do.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
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


def trained_model(folder: Path, run_dir: Path, seconds: float, kind: str = "vector") -> Path:
    """The family's default model trained for `seconds` on `folder`: outputs that look like what users write."""
    from vaetool.config import ModelConfig, TrainConfig
    from vaetool.training.trainer import train

    train([folder], run_dir, model_config=ModelConfig(kind=kind), train_config=TrainConfig(time_limit=seconds),
          device="cpu", force=True, cache_dir=run_dir.parent / "cache", report=False)
    return run_dir / "model.safetensors"


# ------------------------------------------------------------------------------- the installed command


def timed(cmd: list[str]) -> tuple[float, float, float, float]:
    """(wall seconds, peak RSS in MiB, user CPU s, kernel CPU s) of one child process: its own peak, not the
    max over all children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime, usage.ru_stime  # ru_maxrss is KiB on Linux


def command_line(command: str, ckpt: Path, folder: Path, count: int, out: Path, batch: int) -> list[str]:
    if command == "encode":
        cmd = [VAETOOL, "encode", str(ckpt), str(folder), "-o", f"{out}.safetensors"]
    elif command == "sample":
        cmd = [VAETOOL, "sample", str(ckpt), "-n", str(count), "-o", str(out)]
    else:
        cmd = [VAETOOL, command, str(ckpt), str(folder), "-o", str(out)]
    return cmd + ["--batch-size", str(batch), "--device", "cpu", "-q", "--force"]


def cli_runs(command: str, ckpt: Path, folders: dict[int, Path], work: Path, batch: int) -> dict[str, float]:
    small, full = sorted(folders)
    runs = {}
    for count in (small, full):
        out = work / f"{command}-{count}"
        runs[count] = timed(command_line(command, ckpt, folders[count], count, out, batch))
        shutil.rmtree(out, ignore_errors=True)
        Path(f"{out}.safetensors").unlink(missing_ok=True)
    steady = (full - small) / max(runs[full][0] - runs[small][0], 1e-9)
    per_image = lambda k: 1000 * (runs[full][k] - runs[small][k]) / (full - small)  # noqa: E731  steady CPU ms
    return {"steady": steady, "whole": full / runs[full][0], "rss_small": runs[small][1], "rss_full": runs[full][1],
            "user": per_image(2), "sys": per_image(3)}


# ----------------------------------------------------------------------- engine vs bare model, in process


def engine_pass(command: str, ckpt, found: list, out: Path, batch: int) -> float:
    """Seconds for the engine's streaming pass over `found` (what the command does after start-up)."""
    from vaetool.inference import latent_ops as ops

    shutil.rmtree(out, ignore_errors=True)
    inputs = [str(f.path) for f in found]
    start = time.perf_counter()
    if command == "encode":
        ops.encode_to_file(ckpt, inputs, out.with_suffix(".safetensors"), batch_size=batch, force=True)
    elif command == "reconstruct":
        from vaetool.inference.reconstruct import reconstruct_folder

        reconstruct_folder(ckpt, inputs, out, batch_size=batch, force=True)
    else:
        from vaetool.inference.latent_space import sample_latents

        z = sample_latents(ckpt, len(found), seed=0)  # as `vaetool sample` draws them, for any family
        ops.write_decoded(ckpt, z, [out / f"sample_{i:05d}.png" for i in range(len(found))], batch_size=batch,
                          force=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def no_file_writes():
    """The engine with its image writer doing nothing: what is left is decoding, the model and the plumbing."""
    from vaetool.inference.folder import Writer

    defaults = Writer.__init__.__kwdefaults__
    real = defaults["write"]
    defaults["write"] = lambda path, pixels, **options: path
    try:
        yield
    finally:
        defaults["write"] = real


def forward_pass(command: str, model, x: torch.Tensor, count: int) -> float:
    """Seconds for the bare model over `count` images, one in-memory batch reused: compute only.

    What each command must compute, for any family: encode, the posterior means of every level (for a
    hierarchy, its top-down pass); sample, drawing every level from the prior and decoding; reconstruct,
    the model's own `reconstruct` (decoding the means; a hierarchy's one top-down pass, as the command runs it)."""
    batch, generator = len(x), torch.Generator().manual_seed(0)
    step = {"encode": lambda: model.encode(x).mode(),
            "sample": lambda: model.mean_image(model.decode(model.sample_prior(batch, generator=generator))),
            "reconstruct": lambda: model.reconstruct(x)}[command]
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(-(-count // batch)):
            step()
    return time.perf_counter() - start


def in_memory_batch(found: list, model, batch: int) -> torch.Tensor:
    """The folder's first images as one float batch (B, C, S, S), channels_last: the same pixels the engine
    sees (random noise would not do: an untrained model's speed depends on its activations' values)."""
    from vaetool.io.decode import load_image

    cfg = model.config
    x = torch.stack([load_image(f.path, image_size=cfg.image_size, channels=cfg.channels) for f in found[:batch]])
    return (x.float() / 255).contiguous(memory_format=torch.channels_last)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def interleaved(command: str, ckpt, found: list, work: Path, batch: int, rounds: int) -> dict[str, float]:
    model = ckpt.model
    x = in_memory_batch(found, model, batch)
    count = -(-len(found) // batch) * batch  # the bare model runs whole batches
    engine_pass(command, ckpt, found[:batch], work / "warm", batch)  # warm-up: threads, allocator
    forward_pass(command, model, x, batch)
    ratios, engine_rates, bare_rates, engine_cpu, bare_cpu, unwritten = [], [], [], [], [], []
    for _ in range(rounds):
        start = cpu_seconds()
        engine = len(found) / engine_pass(command, ckpt, found, work / f"{command}-engine", batch)
        middle = cpu_seconds()
        bare = count / forward_pass(command, model, x, count)
        engine_cpu.append(1000 * (middle - start) / len(found))
        bare_cpu.append(1000 * (cpu_seconds() - middle) / count)
        ratios.append(engine / bare)
        engine_rates.append(engine)
        bare_rates.append(bare)
        if command != "encode":  # encode writes one file at the end: nothing to leave out
            with no_file_writes():
                unwritten.append(len(found) / engine_pass(command, ckpt, found, work / f"{command}-dry", batch) / bare)
    shutil.rmtree(work / f"{command}-engine", ignore_errors=True)
    med = statistics.median
    return {"engine": med(engine_rates), "bare": med(bare_rates), "ratio": med(ratios), "lo": min(ratios),
            "hi": max(ratios), "engine_cpu": med(engine_cpu), "bare_cpu": med(bare_cpu),
            "unwritten": med(unwritten) if unwritten else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000, help="images in the full folder")
    parser.add_argument("--small", type=int, default=640, help="images in the small folder and in each round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="engine/bare-model pairs per command")
    parser.add_argument("--commands", default="encode,reconstruct,sample")
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data", help="where the face folders are kept")
    parser.add_argument("--checkpoint", type=Path, help="a trained model (else one of --model is trained)")
    parser.add_argument("--model", default="vector", help="the family trained when no --checkpoint is given")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--out-dir", type=Path, help="where the commands write (default: a temporary folder); "
                        "/dev/shm takes the disk out of the measurement")
    args = parser.parse_args()
    from vaetool.inference.load import load_for_inference
    from vaetool.io.find import find_images

    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vaetool-infer-"))
    folders = {n: faces(args.data / f"faces{n}", n) for n in (args.small, args.count)}
    path = args.checkpoint or trained_model(folders[args.small], work / "run", args.train_seconds, args.model)
    ckpt = load_for_inference(path, device="cpu")  # as the commands do
    found = find_images([folders[args.small]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, 64x64 RGB, "
          f"{ckpt.config.kind} model; load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'':12s} {'installed command':^81s} | {f'in process, {args.rounds} rounds of {args.small} images':^76s}")
    print(f"{'command':12s} {'steady img/s':>12s} {'whole img/s':>11s} {f'RSS MiB @{args.small}':>14s} "
          f"{f'RSS MiB @{args.count}':>14s} {'user ms/img':>11s} {'kernel ms/img':>13s} | {'engine img/s':>12s} {'forward img/s':>13s} {'ratio (min-max)':>17s} "
          f"{'CPU ms/img':>10s} {'fwd CPU':>8s} {'ratio':>6s} {'no-write ratio':>14s}")
    for command in args.commands.split(","):
        outputs = Path(tempfile.mkdtemp(prefix="vaetool-infer-out-", dir=args.out_dir)) if args.out_dir else work
        cli = cli_runs(command, path, folders, outputs, args.batch_size)
        mix = interleaved(command, ckpt, found, outputs, args.batch_size, args.rounds)
        if outputs != work:
            shutil.rmtree(outputs, ignore_errors=True)
        print(f"{command:12s} {cli['steady']:12.1f} {cli['whole']:11.1f} {cli['rss_small']:14.0f} "
              f"{cli['rss_full']:14.0f} {cli['user']:11.3f} {cli['sys']:13.3f} | {mix['engine']:12.1f} {mix['bare']:13.1f} "
              f"{mix['ratio']:6.2f} ({mix['lo']:.2f}-{mix['hi']:.2f}) {mix['engine_cpu']:10.2f} {mix['bare_cpu']:8.2f} "
              f"{mix['bare_cpu'] / mix['engine_cpu']:6.2f} {mix['unwritten']:14.2f}", flush=True)
    print(f"outputs written under {args.out_dir or tempfile.gettempdir()}")
    print(f"load average at end {os.getloadavg()[0]:.1f}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"ratios: engine / forward-only throughput (median of rounds), forward / engine CPU per image, "
          f"engine with its file writes left out / forward-only")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
