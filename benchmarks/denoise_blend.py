"""The Wiener step's blend on the models `benchmarks/denoise.py` trained (supervised, noisy only by DivNoising,
noisy only recorrupted): vaetool's default end to end (the
Monte-Carlo SURE blend), the blend with the pilot counted as fixed (from the same pilots), the model alone,
BM3D (true sigma) and scikit-image NL-means; PSNR and images/s on the first N held-out images per level, of
the faces and the detail-rich set, and the photographs (out of domain: the detail-rich set's models).

    .venv/bin/python benchmarks/denoise_blend.py [N=30] [SET ...]      # after benchmarks/denoise.py
"""
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import denoise as D  # noqa: E402
from denoise_data import load, make_noisy  # noqa: E402
from denoise_methods import anchors, psnr  # noqa: E402

from vaetool.checkpoint import load_model  # noqa: E402
from vaetool.inference.tiledenoise import denoise_image  # noqa: E402
from vaetool.inference.wiener import wiener_step  # noqa: E402
from vaetool.models.noise_level import estimate_image_sigma  # noqa: E402


def main() -> None:
    out = D.ROOT / "benchmarks" / "out" / "denoise"
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    results = []
    for name in sys.argv[2:] or ("faces", "detail", "photos"):
        test = out / name / "test"
        models = "detail" if name == "photos" else name
        for sigma in (15, 25, 50):
            pairs = make_noisy(test, out / f"eval-{name}" / f"noisy-{sigma:g}", sigma)[:n]
            clean = [load(c) for c, _ in pairs]
            row = {"set": name, "sigma": sigma, "noisy": statistics.mean(psnr(load(x), c) for (_, x), c in zip(pairs, clean))}
            for kind, ckpt in (("supervised", out / f"run-{models}-supervised" / "model.safetensors"),
                               ("noisy-only", out / f"run-{models}-noisy-{sigma:g}" / "model.safetensors"),
                               ("recorrupted", out / f"run-{models}-recorrupt-{sigma:g}" / "model.safetensors")):
                outs, secs = D.run_vaetool(ckpt, pairs, out / "qe-out")
                row[kind] = statistics.mean(psnr(o, c) for o, c in zip(outs, clean))
                row[kind + " img/s"] = len(pairs) / secs
                outs, secs = D.run_vaetool(ckpt, pairs, out / "qe-out", wiener=False)
                row[kind + " alone"] = statistics.mean(psnr(o, c) for o, c in zip(outs, clean))
                model = load_model(ckpt).model.eval()
                fixed = []
                with torch.inference_mode():
                    for (_, x), c in zip(pairs, clean):
                        a = load(x)  # (H, W) for a grayscale photograph, else (H, W, 3)
                        t = torch.from_numpy(a)[None] if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)
                        s = (model.config.noise_sigma if kind == "noisy-only" and model.config.noise_sigma > 0
                             else estimate_image_sigma(t))
                        f = wiener_step(t, denoise_image(model, t), s).permute(1, 2, 0).numpy().reshape(a.shape)
                        fixed.append(psnr(np.round(f * 255) / 255, c))
                row[kind + " pilot fixed"] = statistics.mean(fixed)
            for label, method in anchors().items():
                if "OpenCV" in label or "TV" in label:
                    continue
                outs, secs = D.run_anchor(method, pairs, sigma / 255.0)
                row[label] = statistics.mean(psnr(o, c) for o, c in zip(outs, clean))
                row[label + " img/s"] = len(pairs) / secs
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            results.append(row)
    (out / f"quick_eval-{'-'.join(sys.argv[2:]) or 'all'}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
