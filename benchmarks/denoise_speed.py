"""The throughput of `denoise` on the models `benchmarks/denoise.py` trained, side by side with scikit-image
NL-means on the same files: the defaults (the Wiener step with block matching and the Monte-Carlo blend),
`--no-block-matching`, `--no-wiener` (the model alone); images/s end to end (`denoise_files`: read, denoise,
write), interleaved rounds, the supervised model of each set at noise std 25, and the photographs.

    .venv/bin/python benchmarks/denoise_speed.py [ROUNDS=3]      # after benchmarks/denoise.py
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import denoise as D  # noqa: E402
from denoise_data import make_noisy  # noqa: E402
from denoise_methods import nl_means  # noqa: E402


def main() -> None:
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
