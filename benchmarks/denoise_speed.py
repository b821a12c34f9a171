"""The throughput of `denoise` on the models `benchmarks/denoise.py` trained, side by side with scikit-image
NL-means on the same files: the defaults (the Wiener step with block matching and the Monte-Carlo blend),
`--no-block-matching`, `--no-wiener` (the model alone); images/s end to end (`denoise_files`: read, denoise,
write), interleaved rounds, the supervised model of each set at noise std 25, and the photographs.
`--step`: the Wiener step alone (the Monte-Carlo blend) on synthetic images of three sizes, one thread, CPU
ms per image, the minimum of 4 runs; no models needed.

    .venv/bin/python benchmarks/denoise_speed.py [ROUNDS=3]      # after benchmarks/denoise.py
    .venv/bin/python benchmarks/denoise_speed.py --step
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import denoise as D  # noqa: E402
from denoise_data import make_noisy  # noqa: E402
from denoise_methods import nl_means  # noqa: E402


def step_speed() -> None:
    from vaetool.inference.wiener import WienerStep

    torch.set_num_threads(1)
    sigma, generator = 25 / 255, torch.Generator().manual_seed(0)
    for size, repeats in ((64, 10), (256, 1), (512, 1)):
        clean = torch.rand(3, size, size, generator=generator)
        noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
        pilot = (clean + 0.03 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
        moved_pilot = (pilot + 0.001 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
        step = WienerStep(sigma, "given")
        probe = step.probe(noisy)
        step(noisy, pilot, probe, moved_pilot)  # warm-up
        times = []
        for _ in range(4):
            start = time.process_time()
            for _ in range(repeats):
                step(noisy, pilot, probe, moved_pilot)
            times.append((time.process_time() - start) / repeats * 1e3)
        print(json.dumps({"size": f"{size}x{size}", "step CPU ms per image": round(min(times), 1)}), flush=True)


def main() -> None:
    if "--step" in sys.argv:
        return step_speed()
    out = D.ROOT / "benchmarks" / "out" / "denoise"
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    cases = [(name, out / name / "test", out / f"run-{name}-supervised" / "model.safetensors", 60)
             for name in ("faces", "detail")]
    cases.append(("photos", out / "photos" / "test", out / "run-detail-supervised" / "model.safetensors", 6))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
    for name, test, checkpoint, count in cases:
        pairs = make_noisy(test, out / f"eval-{name}" / "noisy-25", 25)[:count]
        runs = {"default": {}, "--no-block-matching": {"block_matching": False}, "--no-wiener": {"wiener": False}}
        rates: dict[str, list[float]] = {label: [] for label in (*runs, "NL-means")}
        for _ in range(rounds):
            for label, options in runs.items():
                _, seconds = D.run_vaetool(checkpoint, pairs, out / "speed-out", **options)
                rates[label].append(len(pairs) / seconds)
            _, seconds = D.run_anchor(nl_means, pairs, 25 / 255)  # in memory, one thread
            rates["NL-means"].append(len(pairs) / seconds)
        print(json.dumps({"set": name, "images": len(pairs),
                          **{label: [round(r, 1) for r in values] for label, values in rates.items()}}), flush=True)


if __name__ == "__main__":
    main()
