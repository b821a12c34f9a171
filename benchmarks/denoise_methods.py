"""The anchors of the denoising benchmark (BM3D, scikit-image NL-means and TV, OpenCV NL-means) and the metrics."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1 if a.ndim == 3 else None))


def estimated_sigma(noisy: np.ndarray) -> float:
    """The noise std estimated from the image: MAD of the finest diagonal Haar coefficients / 0.6745 (as
    scikit-image's `estimate_sigma`, without PyWavelets); what a user without a known sigma has."""
    x = noisy if noisy.ndim == 3 else noisy[..., None]
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2].astype(np.float64)
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2
    return float(np.mean(np.median(np.abs(diagonal), axis=(0, 1)) / 0.6745))


def bm3d_true_sigma(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (Dabov et al. 2007, the `bm3d` package) given the true noise std: its best case."""
    import bm3d

    if noisy.ndim == 3:
        return bm3d.bm3d_rgb(noisy, sigma_psd=sigma)
    return bm3d.bm3d(noisy, sigma_psd=sigma)


def nl_means(noisy: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """scikit-image's NL-means with its own recipe: h = 0.8 sigma, fast mode, 5x5 patches."""
    from skimage.restoration import denoise_nl_means

    sigma = estimated_sigma(noisy)
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6,
                            channel_axis=-1 if noisy.ndim == 3 else None)


def tv(noisy: np.ndarray, sigma: float | None = None) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=estimated_sigma(noisy), channel_axis=-1 if noisy.ndim == 3 else None)


def opencv_nl_means(noisy: np.ndarray, sigma: float | None = None) -> np.ndarray:
    import cv2

    u8 = np.round(noisy * 255).astype(np.uint8)
    h = max(3.0, estimated_sigma(noisy) * 255 * 0.8)
    out = cv2.fastNlMeansDenoisingColored(u8, None, h, h, 7, 21) if u8.ndim == 3 else \
        cv2.fastNlMeansDenoising(u8, None, h, 7, 21)
    return out.astype(np.float32) / 255.0


def anchors(*, with_bm3d: bool = True) -> dict[str, object]:
    """label -> f(noisy, true sigma) -> denoised, for the methods installed here."""
    methods: dict[str, object] = {}
    if with_bm3d:
        try:
            import bm3d  # noqa: F401

            methods["BM3D (true sigma)"] = bm3d_true_sigma
        except ImportError:
            print("BM3D left out: pip install bm3d (a benchmark dependency only)", flush=True)
    methods["scikit-image NL-means"] = nl_means
    methods["scikit-image TV (Chambolle)"] = tv
    try:
        import cv2  # noqa: F401

        methods["OpenCV fastNlMeans"] = opencv_nl_means
    except ImportError:
        pass
    return methods
