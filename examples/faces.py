"""Procedural cartoon faces with known continuous attributes (smile, eyes, colours, pose): PNGs plus attributes.csv."""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Attribute name -> (low, high); each face draws every attribute uniformly, in this order.
# Lengths are fractions of the image side; hues are on the colour wheel (0 red, 1/3 green, 2/3 blue).
ATTRIBUTES: dict[str, tuple[float, float]] = {
    "smile": (-1.0, 1.0),  # mouth curvature: -1 frown, 0 flat line, +1 grin
    "eye_size": (0.5, 1.5),  # relative to the face
    "eye_spacing": (0.75, 1.25),  # relative to the face width
    "face_hue": (-0.12, 0.6),  # pinks, reds, oranges, yellows (skin and brown), then cartoon greens and blues
    "face_lightness": (0.35, 0.8),
    "face_size": (0.28, 0.4),  # half-height of the face ellipse
    "face_aspect": (0.75, 1.1),  # ellipse width / height
    "face_x": (-0.1, 0.1),  # centre offset from the middle of the image
    "face_y": (-0.08, 0.08),
    "background_hue": (0.0, 1.0),
    "background_lightness": (0.15, 0.9),
}
SUPERSAMPLE = 4  # drawn this many times larger, then shrunk with LANCZOS: smooth edges
CSV_NAME = "attributes.csv"


def face_attributes(seed: int, index: int) -> dict[str, float]:
    """The attributes of face `index`; they depend only on (seed, index), so any prefix of a dataset is stable."""
    rng = np.random.default_rng([seed, index])
    return {name: float(rng.uniform(low, high)) for name, (low, high) in ATTRIBUTES.items()}


def _rgb(hue: float, lightness: float, saturation: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, min(max(lightness, 0.0), 1.0), saturation)
    return round(r * 255), round(g * 255), round(b * 255)


def _box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    return cx - rx, cy - ry, cx + rx, cy + ry


def _draw_eyes(draw: ImageDraw.ImageDraw, a: dict[str, float], cx: float, cy: float, rx: float, ry: float,
               ink: tuple[int, int, int], line: int) -> None:
    """Two white eyes with dark pupils, and an eyebrow over each."""
    eye_r = 0.17 * ry * a["eye_size"]
    eye_y = cy - 0.22 * ry
    for side in (-1, 1):
        ex = cx + side * 0.4 * rx * a["eye_spacing"]
        draw.ellipse(_box(ex, eye_y, eye_r, eye_r * 1.1), fill=(250, 250, 250), outline=ink, width=max(1, line // 2))
        pupil = 0.55 * eye_r
        draw.ellipse(_box(ex, eye_y + 0.1 * eye_r, pupil, pupil), fill=(20, 20, 30))
        brow_y = eye_y - eye_r * 1.1 - 0.1 * ry  # above the eye whatever its size
        draw.line([(ex - 0.9 * eye_r - 0.05 * rx, brow_y + 0.03 * ry), (ex, brow_y - 0.02 * ry),
                   (ex + 0.9 * eye_r + 0.05 * rx, brow_y + 0.03 * ry)], fill=ink, width=line, joint="curve")


def _draw_mouth(draw: ImageDraw.ImageDraw, smile: float, cx: float, cy: float, rx: float, ry: float,
                line: int) -> None:
    """A thick parabolic mouth: corners up for smile > 0, down for smile < 0, a flat line at 0."""
    half_width = 0.42 * rx
    depth = 0.3 * ry * smile  # how far the middle sits below the corners (image y points down)
    mouth_y = cy + 0.45 * ry  # the curve is centred here whatever the smile, so it stays inside the face
    xs = np.linspace(-1.0, 1.0, 33)
    points = [(cx + x * half_width, mouth_y + depth * (0.5 - x * x)) for x in xs]
    colour = (70, 10, 20)
    draw.line(points, fill=colour, width=line, joint="curve")
    for px, py in (points[0], points[-1]):  # round caps at the corners
        draw.ellipse(_box(px, py, line / 2, line / 2), fill=colour)


def draw_face(attributes: dict[str, float], size: int) -> Image.Image:
    """One RGB face of `size` x `size` pixels from its attributes (the keys of ATTRIBUTES)."""
    a = attributes
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _rgb(a["background_hue"], a["background_lightness"], 0.45))
    draw = ImageDraw.Draw(image)
    cx, cy = (0.5 + a["face_x"]) * big, (0.5 + a["face_y"]) * big
    ry = a["face_size"] * big
    rx = ry * a["face_aspect"]
    skin = (a["face_hue"], a["face_lightness"], 0.6)
    ink = _rgb(skin[0], skin[1] * 0.3, 0.5)  # outline: a dark shade of the face colour
    line = max(2, round(0.022 * big))  # about 1.4 px at 64 x 64
    draw.ellipse(_box(cx, cy, rx, ry), fill=_rgb(*skin), outline=ink, width=line)
    _draw_eyes(draw, a, cx, cy, rx, ry, ink, line)
    _draw_mouth(draw, a["smile"], cx, cy, rx, ry, max(3, round(0.12 * ry)))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # PIL writes no timestamp: same pixels, same bytes
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _relative_path(index: int, subfolders: int) -> str:
    name = f"face_{index:05d}.png"
    return f"part_{index % subfolders}/{name}" if subfolders > 0 else name


def make_faces(out_dir: str | Path, *, count: int = 2000, size: int = 64, seed: int = 0,
               subfolders: int = 0, hold: dict[str, float] | None = None) -> list[Path]:
    """Write `count` face PNGs and `attributes.csv` (path relative to `out_dir`, then ATTRIBUTES) into `out_dir`.

    With `subfolders` > 0 the images are spread over `part_0/` ... `part_{subfolders-1}/`.
    `hold` fixes attributes at one value for every face (the others are drawn exactly as without it).
    Existing files of the same names are replaced; other files in `out_dir` are left alone.
    Returns the image paths, in index order.
    """
    if count < 0 or size < 8 or seed < 0 or subfolders < 0:
        raise ValueError(f"need count >= 0, size >= 8, seed >= 0 and subfolders >= 0; "
                         f"got {count}, {size}, {seed}, {subfolders}")
    hold = dict(hold or {})
    unknown = sorted(set(hold) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(unknown)}; choose from {', '.join(ATTRIBUTES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(subfolders):
        (out / f"part_{k}").mkdir(exist_ok=True)
    paths, rows = [], []
    for index in range(count):
        attributes = {**face_attributes(seed, index), **hold}
        relative = _relative_path(index, subfolders)
        path = out / relative
        _write_atomic(path, _png_bytes(draw_face(attributes, size)))
        paths.append(path)
        rows.append([relative] + [f"{attributes[name]:.6f}" for name in ATTRIBUTES])
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", *ATTRIBUTES])
    writer.writerows(rows)
    _write_atomic(out / CSV_NAME, table.getvalue().encode("utf-8"))
    return paths


def read_attributes(csv_path: str | Path) -> dict[str, dict[str, float]]:
    """attributes.csv -> {relative path: {attribute: value}}."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return {row.pop("path"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)}


def main(argv: list[str] | None = None) -> None:
    """Command line: generate the dataset and print its folder on stdout."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write into (created if missing)")
    parser.add_argument("--count", type=int, default=2000, help="number of faces (default 2000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--subfolders", type=int, default=0, help="spread images over K part_* folders")
    parser.add_argument("--hold", action="append", default=[], metavar="NAME=VALUE",
                        help=f"give every face this attribute value (repeatable); attributes: {', '.join(ATTRIBUTES)}")
    args = parser.parse_args(argv)
    try:
        hold = {}
        for item in args.hold:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--hold {item!r}: write NAME=VALUE, e.g. face_x=0")
            try:
                hold[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--hold {item!r}: {value!r} is not a number") from None
        make_faces(args.out_dir, count=args.count, size=args.size, seed=args.seed, subfolders=args.subfolders,
                   hold=hold)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        parser.exit(1, f"error: cannot write {args.out_dir}: {exc.strerror or exc}\n")
    print(args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
