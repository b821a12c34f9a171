"""Each model family trained for the same wall time on the detail-rich set; held-out PSNR/SSIM and prior samples.

    python benchmarks/family_quick.py --minutes 2 --count 1300

Trains through the installed `vaetool train --model KIND --time ...`, then measures reconstructions of
held-out images (another seed of examples/detail.py) from the posterior means, and writes a grid of
prior samples per family. Prints one table row per family.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--count", type=int, default=1300)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--models", default="vector,spatial,hierarchical")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "family_quick")
    args = parser.parse_args()
    from vaetool.checkpoint import load_model
    from vaetool.inference.evaluate import psnr, ssim
    from vaetool.io.decode import load_image
    from vaetool.io.find import find_images
    from vaetool.io.write import save_grid

    out = args.out
    data, held = out / "train", out / "heldout"
    for folder, seed, count in ((data, 0, args.count), (held, 1, args.held_out)):
        if not folder.exists():
            subprocess.run([sys.executable, str(ROOT / "examples" / "detail.py"), str(folder), "--count", str(count),
                            "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    x = torch.stack([load_image(f.path, image_size=64, channels=3) for f in find_images([held])]).float() / 255
    vaetool = str(Path(sys.executable).with_name("vaetool"))
    rows = []
    for kind in args.models.split(","):
        run = out / f"run-{kind}"
        done = subprocess.run([vaetool, "train", str(data), "-o", str(run), "--model", kind, "--time",
                               f"{args.minutes * 60:.0f}s", "--force", "--json", "-q", "--no-report"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"model": kind, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        summary = json.loads(done.stdout)
        model = load_model(run / "model.safetensors").model.eval()
        with torch.no_grad():
            recon = torch.cat([model.reconstruct(x[i:i + 50]) for i in range(0, len(x), 50)])
            samples = model.mean_image(model.decode(model.sample_prior(64, generator=torch.Generator().manual_seed(0))))
        save_grid(out / f"samples-{kind}.png", samples, nrow=8, force=True)
        save_grid(out / f"recon-{kind}.png", torch.cat([x[:16], recon[:16]]), nrow=16, force=True)
        rows.append({"model": kind, "steps": summary.get("step"), "images_per_s": summary.get("images_per_s"),
                     "psnr": float(psnr(recon, x).mean()), "ssim": float(ssim(recon, x).mean()),
                     "val_neg_elbo": summary.get("best_val_neg_elbo")})
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
