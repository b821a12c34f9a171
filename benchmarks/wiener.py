"""The Wiener step of `vaetool denoise`: its passes and strides, block matching, and the SURE blend with stronger
pilots.

    .venv/bin/python benchmarks/wiener.py [--out benchmarks/out/denoise] [--sigmas 5,15,25,50]

Reuses what `benchmarks/denoise.py` leaves in its output folder: the supervised denoisers of the faces and the
detail-rich set (4 minutes each) and their held-out images. Noise of each std is added and saved as 8-bit PNG
as there; the model's estimate (the pilot) is computed once per image, then every variant of the step is
applied to it. Stronger pilots are emulated by moving the model's estimate towards the clean image,
P' = S + k (P - S): the model's own errors, k times smaller. The variants named by strides are the blockwise
passes alone, without a blend; "matched" adds the collaborative pass, "blend" the SURE blend (the default
both); "counting the divergence" gives the blend the model's own divergence, by one more forward pass.
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
from vaetool.inference.wiener import wiener_step  # noqa: E402
from vaetool.models.noise_level import estimate_sigma  # noqa: E402

VARIANTS = {"one pass (2)": (2,), "two (2, 2)": (2, 2), "three (2, 2, 2)": (2, 2, 2), "two (3, 2)": (3, 2),
            "two (4, 3)": (4, 3), "two (3, 3)": (3, 3)}
STRONGER = (1.0, 0.5, 0.25)


def _tensor(array: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(array, np.float32))
    return x.permute(2, 0, 1) if x.ndim == 3 else x[None]


def _psnr(outputs: list[torch.Tensor], clean: list[torch.Tensor]) -> float:
    return statistics.mean(float(-10 * torch.log10((o - c).square().mean())) for o, c in zip(outputs, clean))


def model_divergence(model: torch.nn.Module, noisy: torch.Tensor, pilot: torch.Tensor, sigma: float) -> float:
    """The model's divergence in its input, by one Monte-Carlo probe (Ramani et al. 2008): the input moved by
    0.1 sigma along a +-1 vector, one more forward pass."""
    probe = torch.randint(0, 2, noisy.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    step = 0.1 * sigma
    return float((probe * (denoise_image(model, noisy + step * probe) - pilot)).sum()) / step


def measure(name: str, checkpoint: Path, test: Path, work: Path, sigma255: float) -> dict[str, float]:
    pairs = make_noisy(test, work / f"wiener-{name}-{sigma255:g}", sigma255)
    clean = [_tensor(load(c)) for c, _ in pairs]
    noisy = [_tensor(load(n)) for _, n in pairs]
    model = load_model(checkpoint).model.eval()
    with torch.inference_mode():
        pilots = [denoise_image(model, n) for n in noisy]
        divergences = [model_divergence(model, n, p, sigma255 / 255.0) for n, p in zip(noisy, pilots)]
    sigma = sigma255 / 255.0
    row = {"noisy input": _psnr(noisy, clean), "the model alone (pilot)": _psnr(pilots, clean)}
    for label, strides in VARIANTS.items():
        row[label] = _psnr([wiener_step(n, p, sigma, strides=strides, matching=False, blend=False)
                            for n, p in zip(noisy, pilots)], clean)
    row["noisy image as its own pilot, one pass (2)"] = _psnr(
        [wiener_step(n, n, sigma, strides=(2,), matching=False, blend=False) for n in noisy], clean)
    row["(4, 3) + SURE blend (--no-block-matching)"] = _psnr(
        [wiener_step(n, p, sigma, matching=False) for n, p in zip(noisy, pilots)], clean)
    row["(4, 3) + matched, no blend"] = _psnr(
        [wiener_step(n, p, sigma, blend=False) for n, p in zip(noisy, pilots)], clean)
    row["(4, 3) + matched + SURE blend (default)"] = _psnr(
        [wiener_step(n, p, sigma) for n, p in zip(noisy, pilots)], clean)
    row["(4, 3) + matched + SURE blend counting the model's divergence"] = _psnr(
        [wiener_step(n, p, sigma, pilot_divergence=d) for n, p, d in zip(noisy, pilots, divergences)], clean)
    row["(4, 3) + matched + SURE blend, sigma estimated"] = _psnr(
        [wiener_step(n, p, estimate_sigma(n[None])) for n, p in zip(noisy, pilots)], clean)
    for k in STRONGER:
        stronger = [c + k * (p - c) for p, c in zip(pilots, clean)]
        row[f"k={k:g} pilot"] = _psnr(stronger, clean)
        row[f"k={k:g} blockwise + blend"] = _psnr(
            [wiener_step(n, p, sigma, matching=False) for n, p in zip(noisy, stronger)], clean)
        row[f"k={k:g} matched, no blend"] = _psnr(
            [wiener_step(n, p, sigma, blend=False) for n, p in zip(noisy, stronger)], clean)
        row[f"k={k:g} matched + blend"] = _psnr([wiener_step(n, p, sigma) for n, p in zip(noisy, stronger)], clean)
        row[f"k={k:g} matched + blend counting the divergence"] = _psnr(  # the emulated pilot's is k times the model's
            [wiener_step(n, p, sigma, pilot_divergence=k * d) for n, p, d in zip(noisy, stronger, divergences)], clean)
    for label, matching in (("blockwise", False), ("matched", True)):
        start = time.perf_counter()
        for n, p in zip(noisy, pilots):
            wiener_step(n, p, sigma, matching=matching)
        row[f"{label} step images/s"] = len(noisy) / (time.perf_counter() - start)
    print(f"{name} std {sigma255:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "denoise")
    parser.add_argument("--sigmas", default="5,15,25,50")
    args = parser.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    rows = {}
    for name in ("faces", "detail"):
        checkpoint = args.out / f"run-{name}-supervised" / "model.safetensors"
        if not checkpoint.exists():
            sys.exit(f"{checkpoint} is missing: run benchmarks/denoise.py first")
        for sigma in sigmas:
            rows[name, sigma] = measure(name, checkpoint, args.out / name / "test", args.out, sigma)
    labels = list(next(iter(rows.values())))
    print("\n| variant | " + " | ".join(f"{n} {s:g}" for n, s in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{row[label]:.2f}" for row in rows.values()) + " |")


if __name__ == "__main__":
    main()
