"""How close the Wiener step's final blend is to the best blend: `denoise`'s defaults on the first N held-out
images of a set at one noise level (the supervised model `benchmarks/denoise.py` trained), the share of the
filtered image that SURE chose against the share that minimises the error to the clean image (the oracle, which
needs the clean image), and the mean PSNR of the pilot, the filtered image and both blends (in the filter's
colour space, before the clamp to [0, 1]).

    .venv/bin/python benchmarks/blend_oracle.py faces 50 30 [--unclipped]   # after benchmarks/denoise.py

`--unclipped`: the clean images plus Gaussian noise as floats (seeded), not the benchmark's 8-bit noisy files,
whose noise is clipped at 0 and 255.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import denoise as D  # noqa: E402
from denoise_data import load, make_noisy  # noqa: E402

from vaetool.inference import wiener  # noqa: E402
from vaetool.inference.denoise import _prepare_model  # noqa: E402
from vaetool.inference.tiledenoise import denoise_image  # noqa: E402


def main() -> None:
    name, sigma, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = D.ROOT / "benchmarks" / "out" / "denoise"
    pairs = make_noisy(out / name / "test", out / f"eval-{name}" / f"noisy-{sigma}", sigma)[:n]
    run, _, step = _prepare_model(out / f"run-{name}-supervised" / "model.safetensors", device="cpu",
                                  precision="auto", samples=None, seed=0)
    # The step's last call of sure_blend is its final blend: recorded with its inputs.
    calls, chosen_by_sure = [], wiener.sure_blend

    def recorded(noisy, pilot, filtered, *rest):
        share = chosen_by_sure(noisy, pilot, filtered, *rest)
        calls.append((pilot.clone(), filtered.clone(), share))
        return share

    wiener.sure_blend = recorded
    to_filter, _ = wiener._colour_space(3)
    unclipped, generator = "--unclipped" in sys.argv, torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for clean_path, noisy_path in pairs:
            original = torch.from_numpy(load(clean_path)).permute(2, 0, 1).float()
            clean = to_filter(original)
            if unclipped:
                noisy = original + sigma / 255 * torch.randn(original.shape, generator=generator)
            else:
                noisy = torch.from_numpy(load(noisy_path)).permute(2, 0, 1).float()
            denoise_image(run, noisy, wiener=step)
            pilot, filtered, share = calls[-1]
            step_taken = filtered - pilot
            best = float(((clean - pilot) * step_taken).sum() / step_taken.square().sum().clamp_min(1e-12))
            best = min(1.0, max(0.0, best))

            def psnr(image: torch.Tensor) -> float:
                return -10 * float(np.log10(float((image - clean).square().mean())))

            rows.append((share, best, psnr(pilot), psnr(filtered), psnr(torch.lerp(pilot, filtered, share)),
                         psnr(torch.lerp(pilot, filtered, best))))
    r = np.array(rows)
    label = f"{name} std {sigma}{' unclipped' if unclipped else ''}"
    print(f"{label}, {len(r)} images: share SURE {r[:, 0].mean():.3f}, oracle {r[:, 1].mean():.3f} "
          f"(SURE's above in {int((r[:, 0] > r[:, 1]).sum())}); PSNR pilot {r[:, 2].mean():.2f}, filtered "
          f"{r[:, 3].mean():.2f}, SURE blend {r[:, 4].mean():.2f}, oracle blend {r[:, 5].mean():.2f}")


if __name__ == "__main__":
    main()
