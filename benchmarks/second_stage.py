"""The package's second-stage prior (vaetool/training/second_stage.py) against the mixture on the map and N(0, I),
by the two-sample test, on one spatial run; for choosing its budget and size.

    python benchmarks/second_stage.py RUN TRAIN_DIR HELD_OUT_DIR OUT [--seconds 60] [--steps N] [--code 64]
                                      [--features 64] [--flip] [--count 200]

Encodes the training images (with --flip, also mirrored) to the run's posterior means, fits the mixture on
the map (as `vaetool fit-prior` does) and trains a second stage on the maps for --seconds (or --steps), as the
end of `vaetool train --time` does. Scores with `classifier_two_sample_test` against the first --count held-out
images, seed 0:

    reconstructions   the spatial model's reconstructions of those held-out images (what no prior can beat)
    standard          N(0, I)
    mixture           the mixture on the map
    stage2            the second stage: its code mixture, its decoder, the run's decoder
    stage2-recon      held-out maps through the second stage's encoder and decoder (its own ceiling)

Writes OUT/NAME.png grids (64 images each) and OUT/results.json. The run's checkpoint is not changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.utils import save_image

import vaetool.api as api
from vaetool.inference.sample_metric import classifier_two_sample_test
from vaetool.runtime import resolve_precision
from vaetool.training.fit_prior import fit_prior
from vaetool.training.second_stage import fit_second_stage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run"); p.add_argument("train"); p.add_argument("held_out"); p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--steps", type=int, default=None, help="a step budget instead of --seconds")
    p.add_argument("--code", type=int, default=64)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--flip", action="store_true", help="also the mirrored training images (not for digits)")
    p.add_argument("--count", type=int, default=200)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = api.load(a.run, device="cpu")
    train = model.load_images(a.train)
    held = model.load_images(a.held_out)[: a.count]
    maps = model.encode(torch.cat([train, train.flip(-1)]) if a.flip else train).levels["z"].mu
    if maps.ndim != 4:
        raise SystemExit("the second stage is for spatial models (a latent map)")
    results: dict[str, float] = {}

    def score(name: str, images: torch.Tensor) -> None:
        save_image(images[:64], a.out / f"{name}.png", nrow=8)
        results[name] = round(classifier_two_sample_test(held, images[: a.count].clamp(0, 1), seed=0).accuracy, 4)
        print(f"{name:16s} two-sample accuracy {results[name]:.3f}", flush=True)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode({"z": z})

    score("reconstructions", model.reconstruct(held))
    score("standard", model.sample(a.count, prior="standard", seed=0))
    mixture = fit_prior(maps, level="z", seed=0).prior
    score("mixture", decode(mixture.sample(a.count, generator=torch.Generator().manual_seed(0))))
    amp = resolve_precision("auto", torch.device("cpu"), training=True)  # bf16 where the CPU has it, as train runs
    fit = fit_second_stage(maps, level="z", steps=a.steps, seconds=None if a.steps else a.seconds, seed=0, amp=amp,
                           code=a.code, features=a.features)
    print(fit.message(), flush=True)
    stage2 = fit.prior
    score("stage2", decode(stage2.sample(a.count, generator=torch.Generator().manual_seed(0))))
    with torch.no_grad():
        held_maps = model.encode(held).levels["z"].mu
        scale, center = stage2.scale.view(1, -1, 1, 1), stage2.center.view(1, -1, 1, 1)
        codes = stage2.net.encode((held_maps - center) / scale)[0]
    score("stage2-recon", decode(stage2.decode(codes)))
    results |= {"steps": stage2.steps, "seconds": round(fit.seconds, 1), "loss": round(fit.loss, 1),
                "components": stage2.components}
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
