"""Denoising benchmark: PSNR before/after and images/s of vaetool against classical denoisers, on held-out noisy images.

    .venv/bin/python benchmarks/denoise.py [--train-steps 1500] [--train-threads 1] [--quick] [--out DIR]

Datasets: the built-in procedural faces (64 px; test faces drawn with another seed than the training faces)
and the photographs that scikit-image ships (some for training, others for testing). For each, a denoising VAE
of 32 px tiles is trained with `vaetool train --corrupt gaussian:0.05-0.25` on random crops of the training
images, then denoises the whole, larger test images in overlapping tiles. Test images get Gaussian noise of sigma 0.1 and 0.2 (clipped to [0, 1], saved as 8-bit
PNG, as a user would have them). vaetool is timed end to end (read files, denoise, write files); the
classical denoisers in memory on one thread each, with the noise level estimated from the image, as a user
without a known sigma would run them. Also measured: the pipeline's throughput against the model's pure
forward throughput at the same batch size, and peak memory for a folder 4x larger.

Needs scikit-image, which vaetool does not depend on: `.venv/bin/pip install scikit-image`.
OpenCV's fastNlMeans is added when `cv2` is importable (`pip install opencv-python-headless`).
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
VAETOOL = str(Path(sys.executable).with_name("vaetool"))
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "moon",
                "grass", "brick", "page", "clock", "cell")
TEST_PHOTOS = ("camera", "chelsea", "coins", "gravel")
SIGMAS = (0.1, 0.2)
TILE = 32  # both models denoise 32 px tiles, trained on random crops; test images are larger and tiled
MODEL_ARGS = ["--image-size", str(TILE), "--widths", "32,64,128", "--blocks", "0", "--latent-dim", "128", "--flip"]

try:
    import skimage.data
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("this benchmark needs scikit-image (not a vaetool dependency): .venv/bin/pip install scikit-image")


# ------------------------------------------------------------------------------------------- data


def _save(array: np.ndarray, path: Path) -> None:
    """Float (H, W[, 3]) in [0, 1] -> 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


def _photo(name: str) -> np.ndarray:
    """A scikit-image photograph as float in [0, 1]: (H, W) gray or (H, W, 3) colour (alpha dropped)."""
    image = np.asarray(getattr(skimage.data, name)())
    image = image[..., :3] if image.ndim == 3 else image
    return image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0 if image.max() > 1 else 1.0)


def _crops(sources: list[np.ndarray], out: Path, *, count: int, size: int, seed: int) -> None:
    """`count` random `size` x `size` RGB crops of the source images, as PNGs: the tile model's training set."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        image = sources[k % len(sources)]
        top, left = rng.integers(0, image.shape[0] - size + 1), rng.integers(0, image.shape[1] - size + 1)
        crop = image[top: top + size, left: left + size]
        _save(np.repeat(crop[..., None], 3, axis=2) if crop.ndim == 2 else crop, out / f"{k:06d}.png")


def make_faces_data(root: Path, *, faces: int, crops: int, test: int, tile: int) -> tuple[Path, Path]:
    """Crops of 64 px training faces, and whole 64 px test faces drawn with another seed (never seen)."""
    from faces import make_faces

    if not (root / "train").exists():
        sources = [_load(p) for p in make_faces(root / "train-faces", count=faces, size=64, seed=0)]
        _crops(sources, root / "train", count=crops, size=tile, seed=0)
        make_faces(root / "test", count=test, size=64, seed=1)
        (root / "test" / "attributes.csv").unlink()
    return root / "train", root / "test"


def make_photo_data(root: Path, *, crops: int, tile: int) -> tuple[Path, Path]:
    """Random crops of the training photographs, and the test photographs whole."""
    if not (root / "train").exists():
        _crops([_photo(name) for name in TRAIN_PHOTOS], root / "train", count=crops, size=tile, seed=0)
        for name in TEST_PHOTOS:
            _save(_photo(name), root / "test" / f"{name}.png")
    return root / "train", root / "test"


def make_noisy(test: Path, out: Path, sigma: float) -> list[tuple[Path, Path]]:
    """(clean, noisy) PNG pairs: noise of `sigma`, clipped, quantized to 8 bits; seeded."""
    pairs, rng = [], np.random.default_rng(int(sigma * 1000))
    for clean in sorted(test.glob("*.png")):
        noisy = out / clean.name
        if not noisy.exists():
            image = _load(clean)
            _save(image + rng.normal(0.0, sigma, image.shape), noisy)
        pairs.append((clean, noisy))
    return pairs


# ---------------------------------------------------------------------------------------- training


def train(data: Path, run: Path, *, steps: int, threads: int | None, args: list[str]) -> Path:
    """Train a denoising VAE with the command line, as a user would; reuse it if it is already there.

    The budget is in steps, not seconds, so the model's quality does not depend on how busy the machine is.
    """
    checkpoint = run / "model.safetensors"
    if not checkpoint.exists():
        command = [VAETOOL, "train", str(data), "-o", str(run), "--corrupt", "gaussian:0.05-0.25", "--steps",
                   str(steps), "--no-disk-cache", "--force", "-q", "--device", "cpu", *args]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, env=env)
    return checkpoint


# -------------------------------------------------------------------------------------- denoisers


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(np.mean((a.astype(np.float64) - b) ** 2)))


def run_vaetool(checkpoint: Path, pairs: list[tuple[Path, Path]], out: Path) -> tuple[list[np.ndarray], float]:
    """Denoise the noisy files with the engine; seconds from the first file read to the last file written."""
    from vaetool.inference.denoise import denoise_files

    shutil.rmtree(out, ignore_errors=True)
    marks: dict[str, float] = {}
    summary = denoise_files(checkpoint, [str(n) for _, n in pairs], out, device="cpu",
                            callback=lambda event: marks.setdefault(type(event).__name__, time.perf_counter()))
    seconds = time.perf_counter() - marks["Started"]
    assert len(summary.written) == len(pairs) and not summary.failed, summary
    return [_load(out / noisy.name) for _, noisy in pairs], seconds


def _sigma(noisy: np.ndarray) -> float:
    """The noise std estimated from the image (Donoho's MAD of the finest diagonal Haar coefficients).

    This is what `skimage.restoration.estimate_sigma` does, without needing PyWavelets.
    """
    x = noisy if noisy.ndim == 3 else noisy[..., None]
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2].astype(np.float64)
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2  # N(0, sigma^2) for pure noise
    return float(np.mean(np.median(np.abs(diagonal), axis=(0, 1)) / 0.6745))


def nl_means(noisy: np.ndarray) -> np.ndarray:
    sigma = _sigma(noisy)  # scikit-image's own recipe: h = 0.8 sigma, fast mode, 5x5 patches
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6,
                            channel_axis=-1 if noisy.ndim == 3 else None)


def tv(noisy: np.ndarray) -> np.ndarray:
    return denoise_tv_chambolle(noisy, weight=_sigma(noisy), channel_axis=-1 if noisy.ndim == 3 else None)


def opencv_nl_means(noisy: np.ndarray) -> np.ndarray:
    import cv2

    u8 = np.round(noisy * 255).astype(np.uint8)
    h = max(3.0, _sigma(noisy) * 255 * 0.8)
    out = cv2.fastNlMeansDenoisingColored(u8, None, h, h, 7, 21) if u8.ndim == 3 else \
        cv2.fastNlMeansDenoising(u8, None, h, 7, 21)
    return out.astype(np.float32) / 255.0


def classical_methods() -> dict[str, object]:
    methods = {"scikit-image NL-means": nl_means, "scikit-image TV (Chambolle)": tv}
    try:
        import cv2  # noqa: F401

        methods["OpenCV fastNlMeans"] = opencv_nl_means
    except ImportError:
        pass
    return methods


def run_classical(method, pairs: list[tuple[Path, Path]]) -> tuple[list[np.ndarray], float]:
    noisy = [_load(n) for _, n in pairs]
    start = time.perf_counter()
    outputs = [np.clip(method(x), 0, 1) for x in noisy]
    return outputs, time.perf_counter() - start


def evaluate(name: str, checkpoint: Path, test: Path, work: Path) -> list[dict]:
    rows = []
    for sigma in SIGMAS:
        pairs = make_noisy(test, work / f"noisy-{sigma}", sigma)
        clean = [_load(c) for c, _ in pairs]
        before = statistics.mean(psnr(_load(n), c) for (_, n), c in zip(pairs, clean))
        results = {"vaetool (denoising VAE)": run_vaetool(checkpoint, pairs, work / f"out-{sigma}")}
        for label, method in classical_methods().items():
            results[label] = run_classical(method, pairs)
        for label, (outputs, seconds) in results.items():
            after = statistics.mean(psnr(o, c) for o, c in zip(outputs, clean))
            rows.append({"dataset": name, "sigma": sigma, "method": label, "images": len(pairs),
                         "psnr_before": before, "psnr_after": after, "images_per_s": len(pairs) / seconds})
            print(f"{name} sigma {sigma}: {label}: {before:.2f} -> {after:.2f} dB, "
                  f"{len(pairs) / seconds:.2f} images/s", flush=True)
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
    from vaetool.inference.tiledenoise import ModelRunner, split_image
    from vaetool.io.decode import read_image
    from vaetool.runtime import prepare

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    prepare(torch.device("cpu"))  # the allocator settings denoise_files uses, so both sides run alike
    model = load_model(checkpoint).model.to(memory_format=torch.channels_last)
    run, paths = ModelRunner(model), sorted(folder.glob("*.png"))
    inputs = [split_image(read_image(p).pixels, tile=run.size, model_size=run.size, model_channels=run.channels)[0]
              for p in paths]
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

    def call(self, batch):
        start = time.perf_counter()
        try:
            return original(self, batch)
        finally:
            total[0] += time.perf_counter() - start

    runner.__call__ = call
    try:
        yield total
    finally:
        runner.__call__ = original


def peak_rss_mb(checkpoint: Path, folder: Path, out: Path) -> float:
    """Peak resident memory of a `vaetool denoise` process over `folder`, MiB."""
    shutil.rmtree(out, ignore_errors=True)
    process = subprocess.Popen([VAETOOL, "denoise", str(checkpoint), str(folder), "-o", str(out), "-q",
                                "--device", "cpu"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, process.returncode
    return usage.ru_maxrss / 1024


def memory_flatness(checkpoint: Path, root: Path, *, small: int) -> dict:
    from faces import make_faces

    sizes = {}
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
    lines = ["| dataset | noise sigma | method | PSNR noisy (dB) | PSNR denoised (dB) | gain (dB) | images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = r["psnr_after"] - r["psnr_before"]
        lines.append(f"| {r['dataset']} ({r['images']} images) | {r['sigma']} | {r['method']} | "
                     f"{r['psnr_before']:.2f} | {r['psnr_after']:.2f} | {gain:+.2f} | {r['images_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "denoise")
    parser.add_argument("--train-steps", type=int, default=None, help="optimiser steps (batch 64) per model [1500]")
    parser.add_argument("--train-threads", type=int, default=None,
                        help="OMP_NUM_THREADS for training (1 is faster when other jobs share the cores)")
    parser.add_argument("--quick", action="store_true", help="fewer images and 150 training steps: a smoke run")
    args = parser.parse_args()
    quick = args.quick
    steps = args.train_steps or (150 if quick else 1500)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    crops = 5000 if quick else 20000
    faces_train, faces_test = make_faces_data(out / "faces", faces=500 if quick else 2000, crops=crops,
                                              test=32 if quick else 100, tile=TILE)
    photo_train, photo_test = make_photo_data(out / "photos", crops=crops, tile=TILE)
    faces_ckpt = train(faces_train, out / "run-faces", steps=steps, threads=args.train_threads, args=MODEL_ARGS)
    photo_ckpt = train(photo_train, out / "run-photos", steps=steps, threads=args.train_threads, args=MODEL_ARGS)
    rows = evaluate("faces 64x64", faces_ckpt, faces_test, out / "eval-faces")
    rows += evaluate("scikit-image photos", photo_ckpt, photo_test, out / "eval-photos")
    pipeline = [pipeline_efficiency(faces_ckpt, faces_test, out / "pipe-faces", threads=t) for t in (None, 1)]
    pipeline += [pipeline_efficiency(photo_ckpt, photo_test, out / "pipe-photos", threads=t) for t in (None, 1)]
    memory = memory_flatness(faces_ckpt, out / "memory", small=100 if quick else 250)
    result = {"rows": rows, "pipeline": pipeline, "memory_mib": memory, "train_steps": steps,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "wall_seconds": time.time() - started}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print("\n" + table(rows) + "\n")
    for p in pipeline:
        print(f"pipeline {p['folder']}: {p['images']} images, {p['tiles']} tiles, batch {p['batch_size']}, "
              f"{p['threads']} torch thread(s): "
              f"forward only {p['forward_images_per_s']:.2f} images/s, "
              f"end to end {p['end_to_end_images_per_s']:.2f} images/s "
              f"({100 * p['ratio']:.0f}%); model busy {100 * p['model_busy']:.0f}% of the pipeline's time")
    print(f"peak RSS by folder size: {memory}; torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")


if __name__ == "__main__":
    main()
