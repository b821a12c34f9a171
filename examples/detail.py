"""Detail-rich colour images (photo and terrain crops, text, symbols, icons, shapes) from files matplotlib ships."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # detail_parts beside this file, however it is imported
from faces import _write_atomic  # noqa: E402  (the one atomic writer of the examples)
from detail_parts import (SUPERSAMPLE, background, draw_extras, draw_icons, draw_shapes, draw_symbols,  # noqa: E402
                          draw_text, load_assets, photo_crop, terrain_crop)

# What each image mostly shows, and how often; every kind also draws a background and may add clutter.
KINDS: dict[str, float] = {"photo": 0.2, "text": 0.25, "symbol": 0.2, "shapes": 0.2, "icon": 0.15}
CSV_NAME = "labels.csv"


# -------------------------------------------------------------------------------------- one image


def draw_image(seed: int, index: int, *, size: int = 64, stream: int = 0) -> tuple[Image.Image, str]:
    """Image `index` of the set for (seed, stream) and its kind; it depends on nothing else, so prefixes are stable."""
    rng = np.random.default_rng([seed, stream, index])
    assets = load_assets()
    big = size * SUPERSAMPLE
    kind = str(rng.choice(list(KINDS), p=list(KINDS.values())))
    if kind == "photo":
        canvas = photo_crop(rng, assets, big) if rng.random() < 0.7 else terrain_crop(rng, assets, big)
    else:
        canvas = background(rng, assets, big)
        if kind == "text":
            draw_text(canvas, rng, assets, items=int(rng.integers(1, 6)))
        elif kind == "symbol":
            draw_symbols(canvas, rng, assets)
        elif kind == "shapes":
            draw_shapes(canvas, rng, count=int(rng.integers(3, 12)))
        else:
            draw_icons(canvas, rng, assets)
    draw_extras(canvas, rng, assets, count=int(rng.choice([0, 1, 2, 3], p=[0.3, 0.3, 0.25, 0.15])))
    return canvas.resize((size, size), Image.Resampling.LANCZOS), kind


# ------------------------------------------------------------------------------------------ files


def _write_one(job: tuple[Path, str, int, int, int, int, bool]) -> tuple[str, str]:
    out, prefix, seed, stream, index, size, by_kind = job
    image, kind = draw_image(seed, index, size=size, stream=stream)
    relative = f"{kind}/{prefix}{index:05d}.png" if by_kind else f"{prefix}{index:05d}.png"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # PIL writes no timestamp: same pixels, same bytes
    _write_atomic(out / relative, buffer.getvalue())
    return relative, kind


def make_detail(out_dir: str | Path, *, count: int = 2000, size: int = 64, seed: int = 0, stream: int = 0,
                by_kind: bool = False, workers: int = 1) -> list[Path]:
    """Write `count` PNGs and `labels.csv` (path relative to `out_dir`, kind) into `out_dir`; return the paths.

    Image i depends only on (seed, stream, i): another seed or stream gives a disjoint draw, the way to
    make a held-out set. With `by_kind` the images go into one folder per kind. `workers` > 1 draws in
    that many processes (same files). Existing files of the same names are replaced, others left alone.
    """
    if count < 0 or size < 16 or seed < 0 or stream < 0 or workers < 1:
        raise ValueError(f"need count >= 0, size >= 16, seed >= 0, stream >= 0 and workers >= 1; "
                         f"got {count}, {size}, {seed}, {stream}, {workers}")
    out = Path(out_dir)
    for folder in [out, *(out / k for k in KINDS if by_kind)]:
        folder.mkdir(parents=True, exist_ok=True)
    jobs = [(out, "detail_", seed, stream, i, size, by_kind) for i in range(count)]
    if workers > 1 and count > 64:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:  # spawn: no forked torch/threads
            rows = pool.map(_write_one, jobs, chunksize=64)
    else:
        rows = [_write_one(job) for job in jobs]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", "kind"])
    writer.writerows(rows)
    _write_atomic(out / CSV_NAME, table.getvalue().encode("utf-8"))
    return [out / relative for relative, _ in rows]


def make_split(out_dir: str | Path, *, count: int, held_out: int, size: int = 64, seed: int = 0,
               by_kind: bool = False, workers: int = 1) -> tuple[list[Path], list[Path]]:
    """OUT/train (`count` images, stream 0) and OUT/test (`held_out` images, stream 1): two disjoint draws."""
    out = Path(out_dir)
    options = {"size": size, "seed": seed, "by_kind": by_kind, "workers": workers}
    return (make_detail(out / "train", count=count, stream=0, **options),
            make_detail(out / "test", count=held_out, stream=1, **options))


def main(argv: list[str] | None = None) -> None:
    """Command line: generate the images and print the folder(s) on stdout."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write into (created if missing)")
    parser.add_argument("--count", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); another seed: a held-out set")
    parser.add_argument("--split", type=int, default=0, metavar="N",
                        help="write OUT/train (--count images) and OUT/test (N held-out images) instead")
    parser.add_argument("--by-kind", action="store_true", help="one subfolder per kind (" + ", ".join(KINDS) + ")")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images (default 1)")
    args = parser.parse_args(argv)
    options = {"size": args.size, "seed": args.seed, "by_kind": args.by_kind, "workers": args.workers}
    try:
        if args.split > 0:
            make_split(args.out_dir, count=args.count, held_out=args.split, **options)
        else:
            make_detail(args.out_dir, count=args.count, **options)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        parser.exit(1, f"error: cannot write {args.out_dir}: {exc.strerror or exc}\n")
    if args.split > 0:
        print(args.out_dir / "train")
        print(args.out_dir / "test")
    else:
        print(args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
