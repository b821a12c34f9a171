"""Where the supervised denoiser loses to BM3D: the pilot or the filter? Each filter run on the other's pilot.

On the first N held-out images of a set `benchmarks/denoise.py` made (the supervised model it trained), per noise
level, PSNR of: the model alone; vaetool's blockwise passes (the pilot its collaborative pass gets) and its whole
step without the blend; BM3D (`bm3d_rgb`, true sigma) and its first, hard-thresholding stage alone (its "basic
estimate", its own Wiener stage's pilot); the bm3d package's Wiener stage given vaetool's pilots; vaetool's
collaborative pass given BM3D's basic estimate, and given the mean of that and vaetool's blockwise output.
The package's Wiener stage takes a pilot for one channel at a time, so those rows run it per opponent channel,
each matching its own blocks (`bm3d per channel` is the whole of BM3D run that way, for comparison).

    .venv/bin/pip install bm3d && .venv/bin/python benchmarks/bm3d_gap.py [N=12] [--set detail] [--sigmas 15,25,50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoise_data import load, make_noisy  # noqa: E402
from denoise_methods import psnr  # noqa: E402

from vaetool.checkpoint import load_model  # noqa: E402
from vaetool.inference.tiledenoise import denoise_image  # noqa: E402
from vaetool.inference.wiener import wiener_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bm3d_opponent(noisy: np.ndarray, sigma: float, stage) -> np.ndarray:
    """bm3d on an (H, W, 3) image in the package's opponent colour space: a `BM3DStages` for the whole image
    (luminance matching), "per channel" for the whole of it one channel at a time, or a pilot (H, W, 3) for the
    Wiener stage alone, per channel."""
    import bm3d
    from bm3d import rgb_to

    z, top, bottom, scale, forward = rgb_to(noisy.astype(np.float64), "opp")
    stds = sigma * np.sqrt(scale)  # the noise std of each normalised opponent channel
    if isinstance(stage, np.ndarray):
        pilot = ((stage.reshape(-1, 3) @ forward.T - bottom) / (top - bottom)).reshape(stage.shape)
        out = np.stack([bm3d.bm3d(z[..., k], float(stds[k]), stage_arg=pilot[..., k]) for k in range(3)], -1)
    elif stage == "per channel":
        out = np.stack([bm3d.bm3d(z[..., k], float(stds[k])) for k in range(3)], -1)
    else:
        out = bm3d.bm3d(z, np.transpose(np.atleast_3d(stds), (0, 2, 1)), stage_arg=stage)
    return np.clip(rgb_to(out, "opp", True, top, bottom)[0], 0.0, 1.0)


def main() -> None:
    from bm3d import BM3DStages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, nargs="?", default=12)
    parser.add_argument("--set", default="detail", help="faces or detail [detail]")
    parser.add_argument("--sigmas", default="15,25,50")
    a = parser.parse_args()
    out = ROOT / "benchmarks" / "out" / "denoise"
    model = load_model(out / f"run-{a.set}-supervised" / "model.safetensors").model.eval()
    for sigma255 in (float(s) for s in a.sigmas.split(",")):
        sigma = sigma255 / 255.0
        pairs = make_noisy(out / a.set / "test", out / f"eval-{a.set}" / f"noisy-{sigma255:g}", sigma255)[: a.count]
        rows: dict[str, list[float]] = {}
        for clean_path, noisy_path in pairs:
            clean, noisy = load(clean_path), load(noisy_path)
            x = torch.from_numpy(noisy).permute(2, 0, 1).contiguous()
            with torch.inference_mode():
                pilot = denoise_image(model, x).float()
            blockwise = wiener_step(x, pilot, sigma, matching=False, blend=False)
            ours = wiener_step(x, pilot, sigma, blend=False)
            basic = bm3d_opponent(noisy, sigma, BM3DStages.HARD_THRESHOLDING)
            basic_t = torch.from_numpy(basic).permute(2, 0, 1).float().contiguous()
            as_np = lambda t: t.permute(1, 2, 0).numpy().astype(np.float64)  # noqa: E731
            results = {
                "the model alone": as_np(pilot.clamp(0, 1)),
                "vaetool blockwise passes (its collaborative pass's pilot)": as_np(blockwise),
                "vaetool step, no blend": as_np(ours),
                "BM3D": bm3d_opponent(noisy, sigma, BM3DStages.ALL_STAGES),
                "BM3D per channel": bm3d_opponent(noisy, sigma, "per channel"),
                "BM3D basic estimate (its Wiener stage's pilot)": basic,
                "bm3d Wiener stage on the model alone": bm3d_opponent(noisy, sigma, as_np(pilot.clamp(0, 1))),
                "bm3d Wiener stage on vaetool's blockwise passes": bm3d_opponent(noisy, sigma, as_np(blockwise)),
                "vaetool collaborative pass on BM3D's basic estimate":
                    as_np(wiener_step(x, basic_t, sigma, strides=(), blend=False)),
                "vaetool collaborative pass on the mean of both pilots":
                    as_np(wiener_step(x, 0.5 * (basic_t + blockwise), sigma, strides=(), blend=False)),
            }
            for name, image in results.items():
                rows.setdefault(name, []).append(psnr(np.round(image * 255) / 255, clean))
        print(f"\n{a.set}, noise std {sigma255:g}, {len(pairs)} held-out images, PSNR dB")
        for name, values in rows.items():
            print(f"  {name:58s} {statistics.mean(values):6.2f}", flush=True)


if __name__ == "__main__":
    main()
