"""The Wiener step of `vaetool denoise`: its passes and strides, block matching, and the SURE blend with stronger
pilots.

    .venv/bin/python benchmarks/wiener.py [--out benchmarks/out/denoise] [--sigmas 5,15,25,50]

Reuses what `benchmarks/denoise.py` leaves in its output folder: the supervised denoisers of the faces and the
detail-rich set (4 minutes each) and their held-out images. Noise of each std is added and saved as 8-bit PNG
as there; the model's estimate (the pilot) is computed once per image, then every variant of the step is
applied to it. Stronger pilots are emulated by moving the model's estimate towards the clean image,
P' = S + k (P - S): the model's own errors, k times smaller. The variants named by strides are the blockwise
passes alone, without a blend; "matched" adds the collaborative pass, "blend" the SURE blend. The blend's
risk estimate: "Monte-Carlo" (the default) counts the divergence of the pilot and of the filtered image, from
the model's estimate of the noisy image moved by 0.1 sigma along a +-1 direction (one more forward pass) and
the step run on it too; "pilot fixed" counts the filter's trace alone (the default before); "counting the
model's divergence" the pilot's divergence and the filter's trace with its pilot held fixed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoise_data import ROOT, load, make_noisy  # noqa: E402

from vaetool.checkpoint import load_model  # noqa: E402
from vaetool.inference.tiledenoise import denoise_image  # noqa: E402
from vaetool.inference.wiener import Moved, WienerStep, wiener_step  # noqa: E402
from vaetool.models.noise_level import estimate_image_sigma  # noqa: E402

VARIANTS = {"one pass (2)": (2,), "two (2, 2)": (2, 2), "three (2, 2, 2)": (2, 2, 2), "two (3, 2)": (3, 2),
            "two (4, 3)": (4, 3), "two (3, 3)": (3, 3)}
STRONGER = (1.0, 0.5, 0.25)


def _tensor(array: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(array, np.float32))
    return x.permute(2, 0, 1) if x.ndim == 3 else x[None]


def _psnr(outputs: list[torch.Tensor], clean: list[torch.Tensor]) -> float:
    return statistics.mean(float(-10 * torch.log10((o - c).square().mean())) for o, c in zip(outputs, clean))


def moved_estimate(model: torch.nn.Module, noisy: torch.Tensor, sigma: float) -> Moved:
    """The model's estimate of the noisy image moved as `denoise` moves it (`WienerStep.probe`)."""
    probe = WienerStep(sigma, "as given").probe(noisy)
    return Moved(probe.direction, probe.step, denoise_image(model, probe.moved(noisy)))


def pilot_divergence(moved: Moved, pilot: torch.Tensor) -> float:
    return float((moved.direction * (moved.pilot - pilot)).sum()) / moved.step


def measure(name: str, checkpoint: Path, test: Path, work: Path, sigma255: float) -> dict[str, float]:
    pairs = make_noisy(test, work / f"wiener-{name}-{sigma255:g}", sigma255)
    clean = [_tensor(load(c)) for c, _ in pairs]
    noisy = [_tensor(load(n)) for _, n in pairs]
    model = load_model(checkpoint).model.eval()
    with torch.inference_mode():
        pilots = [denoise_image(model, n) for n in noisy]
        moves = [moved_estimate(model, n, sigma255 / 255.0) for n in noisy]
    divergences = [pilot_divergence(m, p) for m, p in zip(moves, pilots)]
    sigma = sigma255 / 255.0
    row = {"noisy input": _psnr(noisy, clean), "the model alone (pilot)": _psnr(pilots, clean)}
    for label, strides in VARIANTS.items():
        row[label] = _psnr([wiener_step(n, p, sigma, strides=strides, matching=False, blend=False)
                            for n, p in zip(noisy, pilots)], clean)
    row["noisy image as its own pilot, one pass (2)"] = _psnr(
        [wiener_step(n, n, sigma, strides=(2,), matching=False, blend=False) for n in noisy], clean)
    row["(4, 3) + SURE blend, pilot fixed"] = _psnr(
        [wiener_step(n, p, sigma, matching=False) for n, p in zip(noisy, pilots)], clean)
    row["(4, 3) + Monte-Carlo SURE blend (--no-block-matching)"] = _psnr(
        [wiener_step(n, p, sigma, matching=False, moved=m) for n, p, m in zip(noisy, pilots, moves)], clean)
    row["(4, 3) + matched, no blend"] = _psnr(
        [wiener_step(n, p, sigma, blend=False) for n, p in zip(noisy, pilots)], clean)
    row["(4, 3) + matched + SURE blend, pilot fixed"] = _psnr(
        [wiener_step(n, p, sigma) for n, p in zip(noisy, pilots)], clean)
    row["(4, 3) + matched + Monte-Carlo SURE blend (default)"] = _psnr(
        [wiener_step(n, p, sigma, moved=m) for n, p, m in zip(noisy, pilots, moves)], clean)
    row["(4, 3) + matched + SURE blend counting the model's divergence"] = _psnr(
        [wiener_step(n, p, sigma, pilot_divergence=d) for n, p, d in zip(noisy, pilots, divergences)], clean)
    row["(4, 3) + matched + SURE blend, sigma estimated"] = _psnr(
        [wiener_step(n, p, estimate_image_sigma(n)) for n, p in zip(noisy, pilots)], clean)
    for k in STRONGER:
        stronger = [c + k * (p - c) for p, c in zip(pilots, clean)]
        row[f"k={k:g} pilot"] = _psnr(stronger, clean)
        row[f"k={k:g} blockwise + blend"] = _psnr(
            [wiener_step(n, p, sigma, matching=False) for n, p in zip(noisy, stronger)], clean)
        row[f"k={k:g} matched, no blend"] = _psnr(
            [wiener_step(n, p, sigma, blend=False) for n, p in zip(noisy, stronger)], clean)
        row[f"k={k:g} matched + blend, pilot fixed"] = _psnr(
            [wiener_step(n, p, sigma) for n, p in zip(noisy, stronger)], clean)
        row[f"k={k:g} matched + Monte-Carlo blend"] = _psnr(  # the emulated model's estimate of the moved image
            [wiener_step(n, p, sigma, moved=Moved(m.direction, m.step, c + k * (m.pilot - c)))
             for n, p, m, c in zip(noisy, stronger, moves, clean)], clean)
        row[f"k={k:g} matched + blend counting the divergence"] = _psnr(  # the emulated pilot's is k times the model's
            [wiener_step(n, p, sigma, pilot_divergence=k * d) for n, p, d in zip(noisy, stronger, divergences)], clean)
    for label, matching in (("blockwise", False), ("matched", True)):
        for how, use in (("pilot fixed", False), ("Monte-Carlo", True)):
            start = time.perf_counter()
            for n, p, m in zip(noisy, pilots, moves):
                wiener_step(n, p, sigma, matching=matching, moved=m if use else None)
            row[f"{label} step, {how}, images/s"] = len(noisy) / (time.perf_counter() - start)
    print(f"{name} std {sigma255:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    return row


# (reference stride, blocks per stack) of the collaborative pass: the default first.
MATCHING = ((3, 8), (4, 8), (5, 8), (3, 4), (4, 4), (6, 4))


def matching_sweep(name: str, checkpoint: Path, test: Path, work: Path, sigma255: float) -> dict[str, float]:
    """The default step's PSNR and speed (one thread) for each collaborative pass setting."""
    from vaetool.inference import blockmatch

    pairs = make_noisy(test, work / f"wiener-{name}-{sigma255:g}", sigma255)
    clean = [_tensor(load(c)) for c, _ in pairs]
    noisy = [_tensor(load(n)) for _, n in pairs]
    model = load_model(checkpoint).model.eval()
    sigma = sigma255 / 255.0
    with torch.inference_mode():
        pilots = [denoise_image(model, n) for n in noisy]
        moves = [moved_estimate(model, n, sigma) for n in noisy]
    row, saved, threads = {}, (blockmatch.STRIDE, blockmatch.GROUP), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stride, group in MATCHING:
            blockmatch.STRIDE, blockmatch.GROUP = stride, group
            start = time.perf_counter()
            outputs = [wiener_step(n, p, sigma, moved=m) for n, p, m in zip(noisy, pilots, moves)]
            row[f"stride {stride}, {group} blocks images/s"] = len(noisy) / (time.perf_counter() - start)
            row[f"stride {stride}, {group} blocks"] = _psnr(outputs, clean)
    finally:
        blockmatch.STRIDE, blockmatch.GROUP = saved
        torch.set_num_threads(threads)
    print(f"{name} std {sigma255:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "denoise")
    parser.add_argument("--sigmas", default="5,15,25,50")
    parser.add_argument("--matching", action="store_true",
                        help="only the collaborative pass's settings: PSNR and one thread's speed")
    args = parser.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    rows = {}
    for name in ("faces", "detail"):
        checkpoint = args.out / f"run-{name}-supervised" / "model.safetensors"
        if not checkpoint.exists():
            sys.exit(f"{checkpoint} is missing: run benchmarks/denoise.py first")
        for sigma in sigmas:
            what = matching_sweep if args.matching else measure
            rows[name, sigma] = what(name, checkpoint, args.out / name / "test", args.out, sigma)
    labels = list(next(iter(rows.values())))
    print("\n| variant | " + " | ".join(f"{n} {s:g}" for n, s in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{row[label]:.2f}" for row in rows.values()) + " |")


if __name__ == "__main__":
    main()
