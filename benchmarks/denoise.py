"""Denoising benchmark: vaetool against BM3D, NL-means and TV at noise std 15, 25 and 50 (0-255), PSNR, SSIM, images/s.

    .venv/bin/python benchmarks/denoise.py [--train-time 240] [--sigmas 15,25,50] [--outside 5,75] [--test 60]
                                           [--tiny] [--out DIR]

In-domain held-out images: the built-in faces and the detail-rich set (examples/detail.py), 64 px, test images
drawn with another seed or stream than the training ones. Out-of-domain: photographs that scikit-image ships,
denoised by the models trained on the detail-rich set. Noisy images have Gaussian noise of the given std,
clipped to [0, 1] and saved as 8-bit PNG, as a user would have them.

vaetool models (the denoiser defaults that `--corrupt` and `--noise-model` choose: spatial, f = 2, C = 16; each
trained with `vaetool train --time T` on 2 cores, as a user would):
- supervised: clean training images, `--corrupt gaussian:0.04-0.22` (one blind model for all levels), also
  measured at levels outside that range (`--outside`, 5 and 75 by default; on the detail-rich set);
- noisy only (DivNoising): the training images with the test's noise, `--noise-model gaussian` (sigma
  estimated from them), one model per noise level;
- noisy only, recorrupted: the same noisy images, `--noise-model gaussian --recorrupt` (Pang et al. 2021;
  sigma estimated), one model per noise level.
Each vaetool model is measured as `denoise` runs it (the Wiener step with block matching on the posterior mean,
the default for Gaussian denoisers), with `--no-block-matching` (the blockwise Wiener passes only: the step 10
times faster) and with `--no-wiener` (the model's estimate alone: for a noisy-only model the MMSE estimate over
16 posterior samples).
vaetool is timed end to end (read files, denoise, write files). BM3D (`pip install bm3d`) is given the true
sigma; scikit-image's NL-means and TV estimate it from the image, as a user without a known sigma would run
them (one thread each). Also: the MMSE estimate's PSNR and speed against the number of samples, the pipeline's
throughput against the model's forward alone, and peak memory for a folder 4x larger.

Needs scikit-image and bm3d, which vaetool does not depend on: `.venv/bin/pip install scikit-image bm3d`.
`--tiny` is a smoke run of the whole benchmark in about a minute (numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoise_data import (ROOT, load, make_detail_data, make_faces_data, make_noisy,  # noqa: E402
                          make_photo_data)
from denoise_methods import anchors, psnr, ssim  # noqa: E402

VAETOOL = str(Path(sys.executable).with_name("vaetool"))
SUPERVISED_RANGE = "gaussian:0.04-0.22"  # 10 to 56 on the 0-255 scale: covers every tested level
MODEL_ARGS = ["--image-size", "64"]  # the family and latent shape: the denoiser defaults
SAMPLE_COUNTS = (0, 1, 2, 4, 8, 16, 32)

try:
    import skimage  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("this benchmark needs scikit-image (not a vaetool dependency): .venv/bin/pip install scikit-image bm3d")


# ---------------------------------------------------------------------------------------- training


def train(data: Path, run: Path, *, seconds: float, args: list[str]) -> Path:
    """Train with the command line, as a user would, for `seconds` of wall time; reuse a run already there."""
    checkpoint = run / "model.safetensors"
    if not checkpoint.exists():
        command = [VAETOOL, "train", str(data), "-o", str(run), "--time", f"{seconds:g}s", "--no-disk-cache",
                   "--no-report", "--force", "-q", "--device", "cpu", *MODEL_ARGS, *args]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return checkpoint


def train_models(name: str, train_dir: Path, root: Path, *, sigmas: list[float], seconds: float) -> dict[str, Path]:
    """The supervised model, and one noisy-only model per noise level (trained on noisy copies of train_dir)."""
    models = {"supervised": train(train_dir, root / f"run-{name}-supervised", seconds=seconds,
                                  args=["--corrupt", SUPERVISED_RANGE])}
    for sigma in sigmas:
        noisy_train = root / f"{name}-train-noisy-{sigma:g}"
        make_noisy(train_dir, noisy_train, sigma)
        models[f"noisy-{sigma:g}"] = train(noisy_train, root / f"run-{name}-noisy-{sigma:g}", seconds=seconds,
                                           args=["--noise-model", "gaussian"])
        models[f"recorrupt-{sigma:g}"] = train(noisy_train, root / f"run-{name}-recorrupt-{sigma:g}",
                                               seconds=seconds, args=["--noise-model", "gaussian", "--recorrupt"])
    return models


# -------------------------------------------------------------------------------------- evaluation


def run_vaetool(checkpoint: Path, pairs: list[tuple[Path, Path]], out: Path, *,
                samples: int | None = None, wiener: bool | None = None,
                block_matching: bool = True) -> tuple[list[np.ndarray], float]:
    """Denoise the noisy files with the engine; seconds from the first file read to the last file written."""
    from vaetool.inference.denoise import denoise_files

    shutil.rmtree(out, ignore_errors=True)
    marks: dict[str, float] = {}
    summary = denoise_files(checkpoint, [str(n) for _, n in pairs], out, device="cpu", samples=samples,
                            wiener=wiener, block_matching=block_matching,
                            callback=lambda event: marks.setdefault(type(event).__name__, time.perf_counter()))
    seconds = time.perf_counter() - marks["Started"]
    assert len(summary.written) == len(pairs) and not summary.failed, summary
    return [load(out / noisy.name) for _, noisy in pairs], seconds


def run_anchor(method, pairs: list[tuple[Path, Path]], sigma: float) -> tuple[list[np.ndarray], float]:
    noisy = [load(n) for _, n in pairs]
    start = time.perf_counter()
    outputs = [np.clip(method(x, sigma), 0, 1).astype(np.float32) for x in noisy]
    return outputs, time.perf_counter() - start


def score(label: str, dataset: str, sigma: float, pairs, outputs: list[np.ndarray], seconds: float) -> dict:
    clean = [load(c) for c, _ in pairs]
    row = {"dataset": dataset, "sigma": sigma, "method": label, "images": len(pairs),
           "psnr_before": statistics.mean(psnr(load(n), c) for (_, n), c in zip(pairs, clean)),
           "psnr_after": statistics.mean(psnr(o, c) for o, c in zip(outputs, clean)),
           "ssim_after": statistics.mean(ssim(o, c) for o, c in zip(outputs, clean)),
           "images_per_s": len(pairs) / seconds}
    print(f"{dataset} sigma {sigma:g}: {label}: {row['psnr_before']:.2f} -> {row['psnr_after']:.2f} dB, "
          f"SSIM {row['ssim_after']:.3f}, {row['images_per_s']:.2f} images/s", flush=True)
    return row


def evaluate(dataset: str, models: dict[str, Path], test: Path, work: Path, *, sigmas: list[float],
             with_bm3d: bool = True) -> list[dict]:
    rows = []
    for sigma in sigmas:
        pairs = make_noisy(test, work / f"noisy-{sigma:g}", sigma)
        results = {"vaetool supervised (--corrupt)": run_vaetool(models["supervised"], pairs, work / "out-sup"),
                   "vaetool supervised, --no-block-matching": run_vaetool(models["supervised"], pairs,
                                                                          work / "out-sup", block_matching=False),
                   "vaetool supervised, --no-wiener": run_vaetool(models["supervised"], pairs, work / "out-sup",
                                                                  wiener=False)}
        if f"noisy-{sigma:g}" in models:  # levels outside the tested ones have only the supervised model
            noisy_model = models[f"noisy-{sigma:g}"]
            results["vaetool noisy only (--noise-model)"] = run_vaetool(noisy_model, pairs, work / "out-noisy")
            results["vaetool noisy only, --no-block-matching"] = run_vaetool(noisy_model, pairs, work / "out-noisy",
                                                                             block_matching=False)
            results["vaetool noisy only, --no-wiener"] = run_vaetool(noisy_model, pairs, work / "out-noisy",
                                                                     wiener=False)
            recorrupted = models[f"recorrupt-{sigma:g}"]
            results["vaetool noisy only, recorrupted (--recorrupt)"] = run_vaetool(recorrupted, pairs,
                                                                                   work / "out-recorrupt")
            results["vaetool recorrupted, --no-wiener"] = run_vaetool(recorrupted, pairs, work / "out-recorrupt",
                                                                      wiener=False)
        for label, method in anchors(with_bm3d=with_bm3d).items():
            results[label] = run_anchor(method, pairs, sigma / 255.0)
        rows += [score(label, dataset, sigma, pairs, *result) for label, result in results.items()]
    return rows


def samples_sweep(checkpoint: Path, test: Path, work: Path, *, sigma: float) -> list[dict]:
    """The noisy-only model's PSNR and images/s against the number of posterior samples K (0: posterior mean)."""
    pairs = make_noisy(test, work / f"noisy-{sigma:g}", sigma)
    clean = [load(c) for c, _ in pairs]
    rows = []
    for k in SAMPLE_COUNTS:
        outputs, seconds = run_vaetool(checkpoint, pairs, work / f"out-k{k}", samples=k)
        rows.append({"samples": k, "psnr": statistics.mean(psnr(o, c) for o, c in zip(outputs, clean)),
                     "images_per_s": len(pairs) / seconds})
        print(f"samples {k}: {rows[-1]['psnr']:.2f} dB, {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    return rows


# ------------------------------------------------------------------------------ pipeline and memory


def pipeline_efficiency(checkpoint: Path, folder: Path, work: Path, *, batch_size: int = 64, reps: int = 5,
                        threads: int | None = None) -> dict:
    """End-to-end images/s of `denoise_files` against the model's forward alone on the same tiles and batch.

    Both run at the same batch size and torch thread count, alternating `reps` times; the best of each
    is kept, since on a shared machine other jobs only ever make a run slower. `model_busy` is the share
    of the pipeline's wall time spent in the model's forward passes: the rest is decode/write not hidden.
    """
    from vaetool.checkpoint import load_model
    from vaetool.inference.denoise import denoise_files
    from vaetool.inference.tiledenoise import ModelRunner
    from vaetool.io.decode import read_image
    from vaetool.runtime import prepare

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    prepare(torch.device("cpu"))  # the allocator settings denoise_files uses, so both sides run alike
    model = load_model(checkpoint).model.to(memory_format=torch.channels_last)
    run, paths = ModelRunner(model), sorted(folder.glob("*.png"))
    side, max_pixels = run.tiling("auto")
    inputs = [run.split(read_image(p).pixels, tile=side, max_pixels=max_pixels, overlap=0.25)[0] for p in paths]
    tiles = sum(len(x) for x in inputs)
    batch = torch.cat(inputs)[:batch_size]  # real tiles: activations like the pipeline's
    batch = torch.cat([batch] * (-(-batch_size // len(batch))))[:batch_size]
    forward, end_to_end, busy = [], [], []
    for _ in range(reps):  # alternate, so a busy moment on the machine hits both alike
        run(batch)
        start, count = time.perf_counter(), 0
        while count < tiles:
            run(batch)
            count += batch_size
        forward.append(count / (time.perf_counter() - start) * len(paths) / tiles)  # images/s at forward speed
        marks: dict[str, float] = {}
        shutil.rmtree(work, ignore_errors=True)
        with _timed(ModelRunner) as in_model:
            summary = denoise_files(model, [folder], work, batch_size=batch_size, device="cpu",
                                    callback=lambda e: marks.setdefault(type(e).__name__, time.perf_counter()))
        seconds = time.perf_counter() - marks["Started"]
        end_to_end.append(len(summary.written) / seconds)
        busy.append(in_model[0] / seconds)
    torch.set_num_threads(default_threads)
    fwd, e2e = max(forward), max(end_to_end)
    return {"folder": folder.parent.name + "/" + folder.name, "images": len(paths), "tiles": tiles,
            "batch_size": batch_size, "threads": threads or default_threads, "forward_images_per_s": fwd,
            "end_to_end_images_per_s": e2e, "ratio": e2e / fwd, "model_busy": max(busy),
            "forward_all": forward, "end_to_end_all": end_to_end}


@contextlib.contextmanager
def _timed(runner: type) -> Iterator[list[float]]:
    """Seconds spent inside `runner.__call__` (the model's forward passes) while the block runs."""
    total, original = [0.0], runner.__call__

    def call(self, batch, keys=None):
        start = time.perf_counter()
        try:
            return original(self, batch, keys)
        finally:
            total[0] += time.perf_counter() - start

    runner.__call__ = call
    try:
        yield total
    finally:
        runner.__call__ = original


# A child's peak RSS counts the pages it shares with its parent at fork: started from this (large) process it
# would report this process's size. A fresh, small interpreter starts the command and reports its child's.
_PEAK_OF_CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                  "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(checkpoint: Path, folder: Path, out: Path) -> float:
    """Peak resident memory of a `vaetool denoise` process over `folder`, MiB."""
    shutil.rmtree(out, ignore_errors=True)
    report = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, VAETOOL, "denoise", str(checkpoint), str(folder),
                             "-o", str(out), "-q", "--device", "cpu"], check=True, capture_output=True, text=True)
    return int(report.stdout.split()[-1]) / 1024


def memory_flatness(checkpoint: Path, root: Path, *, small: int) -> dict:
    from faces import make_faces

    sizes: dict[int, float] = {}
    for count in (small, 4 * small):
        folder = root / f"faces-{count}"
        if not folder.exists():
            make_faces(folder, count=count, size=64, seed=2)
            (folder / "attributes.csv").unlink()
        sizes[count] = peak_rss_mb(checkpoint, folder, root / f"out-{count}")
        print(f"peak RSS over {count} images: {sizes[count]:.0f} MiB", flush=True)
    return {str(k): v for k, v in sizes.items()}


# ------------------------------------------------------------------------------------------ report


def table(rows: list[dict]) -> str:
    lines = ["| dataset | noise std (0-255) | method | PSNR noisy (dB) | PSNR denoised (dB) | SSIM | images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} ({r['images']} images) | {r['sigma']:g} | {r['method']} | "
                     f"{r['psnr_before']:.2f} | {r['psnr_after']:.2f} | {r['ssim_after']:.3f} | "
                     f"{r['images_per_s']:.2f} |")
    return "\n".join(lines)


def _sizes(tiny: bool, test: int) -> dict:
    if tiny:
        return {"train": 64, "test": 4, "photos": 1, "memory": 16}
    return {"train": 2000, "test": test, "photos": 6, "memory": 250}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "denoise")
    parser.add_argument("--train-time", type=float, default=None, help="seconds of training per model [240]")
    parser.add_argument("--sigmas", default=None, help="noise std on the 0-255 scale, comma separated [15,25,50]")
    parser.add_argument("--outside", default="5,75",
                        help="noise std outside the supervised model's training range, measured on the detail set")
    parser.add_argument("--test", type=int, default=60, help="held-out images per in-domain set [60]")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few images, seconds of training")
    args = parser.parse_args()
    sizes = _sizes(args.tiny, args.test)
    outside = [float(s) for s in args.outside.split(",") if s.strip()]
    seconds = args.train_time or (4 if args.tiny else 240)
    sigmas = [float(s) for s in (args.sigmas or ("25" if args.tiny else "15,25,50")).split(",")]
    out, started = args.out, time.time()
    out.mkdir(parents=True, exist_ok=True)
    faces_train, faces_test = make_faces_data(out / "faces", train=sizes["train"], test=sizes["test"])
    detail_train, detail_test = make_detail_data(out / "detail", train=sizes["train"], test=sizes["test"])
    photos = make_photo_data(out / "photos", count=sizes["photos"])
    faces = train_models("faces", faces_train, out, sigmas=sigmas, seconds=seconds)
    rows = evaluate("faces 64x64", faces, faces_test, out / "eval-faces", sigmas=sigmas)
    sweep = samples_sweep(faces[f"noisy-{sigmas[len(sigmas) // 2]:g}"], faces_test, out / "sweep-faces",
                          sigma=sigmas[len(sigmas) // 2])
    pipeline, memory = [], {}
    if not args.tiny:
        detail = train_models("detail", detail_train, out, sigmas=sigmas, seconds=seconds)
        rows += evaluate("detail-rich 64x64", detail, detail_test, out / "eval-detail", sigmas=sigmas + outside)
        rows += evaluate("scikit-image photos (out of domain)", detail, photos, out / "eval-photos", sigmas=sigmas)
        pipeline = [pipeline_efficiency(faces["supervised"], faces_test, out / "pipe-faces", threads=t)
                    for t in (None, 1)]
        memory = memory_flatness(faces["supervised"], out / "memory", small=sizes["memory"])
    result = {"rows": rows, "samples_sweep": sweep, "pipeline": pipeline, "memory_mib": memory,
              "train_seconds_per_model": seconds, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "wall_seconds": time.time() - started}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\ntraining: {seconds:g} s per model on {os.cpu_count()} cores\n\n" + table(rows) + "\n")
    for p in pipeline:
        print(f"pipeline {p['folder']}: {p['images']} images, batch {p['batch_size']}, {p['threads']} thread(s): "
              f"forward only {p['forward_images_per_s']:.2f} images/s, end to end "
              f"{p['end_to_end_images_per_s']:.2f} images/s ({100 * p['ratio']:.0f}%)")
    if memory:
        print(f"peak RSS by folder size: {memory}")


if __name__ == "__main__":
    main()
