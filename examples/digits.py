"""Procedural handwriting-like digits (an offline stand-in for MNIST): PNGs plus labels.csv."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
              "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Italic.ttf")


def _fonts() -> list[Path]:
    """The DejaVu fonts that matplotlib ships (vaetool depends on matplotlib), so no download is needed."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = [folder / name for name in FONT_FILES if (folder / name).is_file()]
    if not found:
        raise SystemExit(f"no DejaVu fonts under {folder}; reinstall matplotlib")
    return found


def draw_digit(digit: int, rng: np.random.Generator, fonts: list[Path], size: int = 32,
               variety: float = 1.0) -> Image.Image:
    """A white-on-black digit in one of `fonts`; weight, size, slant, rotation and offset vary with `variety`."""
    big = size * 4  # drawn large, then shrunk: smooth strokes
    v = float(np.clip(variety, 0.0, 1.0))
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(big * (0.71 + v * rng.uniform(-0.09, 0.09))))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    stroke = int(round(2 + v * rng.uniform(-2, 2)))
    draw.text((big / 2, big / 2), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    shear = v * rng.uniform(-0.3, 0.3)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, (1, shear, -shear * big / 2, 0, 1, 0),
                              resample=Image.Resampling.BILINEAR)
    canvas = canvas.rotate(v * rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR,
                           translate=tuple(v * rng.uniform(-0.06, 0.06, size=2) * big))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def make_digits(out_dir: str | Path, *, count: int = 3000, size: int = 32, seed: int = 0, variety: float = 1.0,
                fonts: int | None = None) -> Path:
    """Write `count` digit images (balanced classes) and `labels.csv` (path, digit) into `out_dir`; return the CSV."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chosen = _fonts()[:fonts] if fonts else _fonts()
    rows = []
    for i in range(count):
        digit = i % 10
        name = f"digit_{i:05d}.png"
        draw_digit(digit, rng, chosen, size, variety).save(out / name)
        rows.append((name, digit))
    labels = out / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "digit"])
        writer.writerows(rows)
    return labels


def main(argv: list[str] | None = None) -> None:
    """Command line: generate the digits and print their folder on stdout."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="folder to write into (created if missing)")
    parser.add_argument("--count", type=int, default=3000, help="number of images (default 3000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--variety", type=float, default=1.0,
                        help="0: every digit drawn alike, 1: varied weights, sizes, slants and positions (default 1)")
    parser.add_argument("--fonts", type=int, default=None,
                        help=f"use the first N of the {len(FONT_FILES)} fonts (default all)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 8:
        parser.error("need --count >= 1 and --size >= 8")
    make_digits(args.out_dir, count=args.count, size=args.size, seed=args.seed, variety=args.variety,
                fonts=args.fonts)
    print(args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
