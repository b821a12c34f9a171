"""How much the sample metric moves with its seed: one split against the default cross-fitted, repeated test.

`vaetool eval --samples N --seed S` draws N samples with seed S and scores them with a classifier two-sample
test seeded by S. This runs both tests for several seeds on one run's samples: the former one (one split,
one classifier: `repeats=1, cross_fit=False`) and the default (three splits, each cross-fitted), and, as the
calibration, real against real (training images against the held-out ones, where the right answer is 0.5).
The spread over seeds of the same model's score is the test's own noise.

    .venv/bin/python benchmarks/sample_metric_spread.py RUN TRAIN_DIR HELD_OUT_DIR [--count 200] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import vaetool.api as api
from vaetool.inference.sample_metric import REPEATS, classifier_two_sample_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("train", type=Path)
    parser.add_argument("held_out", type=Path)
    parser.add_argument("--count", type=int, default=200, help="held-out images and samples per test [200]")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 [5]")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = parser.parse_args()
    model = api.load(a.run, device="cpu")
    held = model.load_images(a.held_out)[: a.count]
    train = model.load_images(a.train)[: a.count]
    tests = {"one split": dict(repeats=1, cross_fit=False), f"{REPEATS} splits, cross-fitted": {}}
    rows = []
    for seed in range(a.seeds):
        samples = model.sample(a.count, seed=seed).clamp(0, 1)
        row = {"seed": seed}
        for name, options in tests.items():
            start = time.perf_counter()
            row[f"samples, {name}"] = classifier_two_sample_test(held, samples, seed=seed, **options).accuracy
            row[f"real, {name}"] = classifier_two_sample_test(held, train, seed=seed, **options).accuracy
            row[f"seconds, {name}"] = (time.perf_counter() - start) / 2
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(f"\n{a.count} held-out images against {a.count} samples (or {a.count} training images), "
          f"seeds 0-{a.seeds - 1}")
    print(f"{'test':34s} {'mean':>6s} {'std':>6s} {'min':>6s} {'max':>6s} {'s/test':>7s}")
    for name in tests:
        for what in ("samples", "real"):
            values = [r[f"{what}, {name}"] for r in rows]
            print(f"{what + ', ' + name:34s} {statistics.mean(values):6.3f} {statistics.pstdev(values):6.3f} "
                  f"{min(values):6.3f} {max(values):6.3f} {statistics.mean(r[f'seconds, {name}'] for r in rows):7.1f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
