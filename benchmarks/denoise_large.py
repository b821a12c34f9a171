"""Denoisers trained on images larger than the training size: tiles at the files' own resolution (`--patches`,
a denoiser's default) against the images resized to it (`--resize`), and BM3D and NL-means on the same files.

    .venv/bin/python benchmarks/denoise_large.py [--size 256] [--train 300] [--test 20] [--sigma 25]
                                                 [--train-time 240] [--out DIR]

The detail-rich set (examples/detail.py) drawn at `--size` pixels (held-out images from another draw), with
Gaussian noise of std `--sigma` (0-255) clipped and saved as 8-bit PNG. Four models, each `vaetool train
--time T --image-size 64` on 2 cores: from the noisy images alone (`--noise-model gaussian --recorrupt`, sigma
estimated) and from the clean ones (`--corrupt gaussian:0.04-0.22`), each with `--patches` and `--resize`;
then `vaetool denoise` (its defaults) on the held-out noisy files, whole. Reported: the noise sigma each
noisy-only run estimated, the PSNR of each model, BM3D given the true sigma and scikit-image's NL-means, and
images/s. Needs scikit-image and bm3d (benchmark dependencies only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoise import SUPERVISED_RANGE, run_anchor, run_vaetool, train  # noqa: E402
from denoise_data import ROOT, load, make_noisy  # noqa: E402
from denoise_methods import bm3d_true_sigma, nl_means, psnr  # noqa: E402


def make_data(root: Path, *, size: int, train: int, test: int) -> tuple[Path, Path]:
    from detail import make_split

    if not (root / "train").exists():
        make_split(root, count=train, held_out=test, size=size, seed=3, workers=2)
        for split in ("train", "test"):
            (root / split / "labels.csv").unlink()
    return root / "train", root / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=25)
    parser.add_argument("--train-time", type=float, default=240)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "denoise-large")
    args = parser.parse_args()
    root = args.out
    train_dir, test_dir = make_data(root / "detail", size=args.size, train=args.train, test=args.test)
    noisy_train = root / f"train-noisy-{args.sigma:g}"
    make_noisy(train_dir, noisy_train, args.sigma)
    pairs = make_noisy(test_dir, root / f"test-noisy-{args.sigma:g}", args.sigma)
    clean = [load(c) for c, _ in pairs]
    noisy_psnr = statistics.mean(psnr(load(n), c) for (_, n), c in zip(pairs, clean))
    print(f"{len(pairs)} held-out {args.size}x{args.size} images, noise std {args.sigma:g}: noisy {noisy_psnr:.2f} dB",
          flush=True)
    models = {}
    for how in ("--patches", "--resize"):
        name = how.lstrip("-")
        models[f"noisy only (--recorrupt), {how}"] = train(
            noisy_train, root / f"run-recorrupt-{name}", seconds=args.train_time,
            args=["--noise-model", "gaussian", "--recorrupt", how])
        models[f"supervised (--corrupt), {how}"] = train(
            train_dir, root / f"run-supervised-{name}", seconds=args.train_time, args=["--corrupt", SUPERVISED_RANGE, how])
    rows = []
    for label, checkpoint in models.items():
        from vaetool.checkpoint import load_model

        corruption = load_model(checkpoint).train_config.corruptions[0]
        outputs, seconds = run_vaetool(checkpoint, pairs, root / "out")
        rows.append({"method": label, "psnr": statistics.mean(psnr(o, c) for o, c in zip(outputs, clean)),
                     "images_per_s": len(pairs) / seconds,
                     **({"sigma_estimated_255": 255 * corruption.low} if corruption.kind == "recorrupt" else {})})
        print(json.dumps(rows[-1]), flush=True)
    sigma = args.sigma / 255
    for label, method in (("BM3D (true sigma)", bm3d_true_sigma), ("scikit-image NL-means", nl_means)):
        outputs, seconds = run_anchor(method, pairs, sigma)
        rows.append({"method": label, "psnr": statistics.mean(psnr(o, c) for o, c in zip(outputs, clean)),
                     "images_per_s": len(pairs) / seconds})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| method | PSNR dB (noisy {noisy_psnr:.2f}) | sigma estimated (0-255) | images/s |\n|---|---|---|---|")
    for row in rows:
        estimate = f"{row['sigma_estimated_255']:.2f}" if "sigma_estimated_255" in row else ""
        print(f"| {row['method']} | {row['psnr']:.2f} | {estimate} | {row['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
